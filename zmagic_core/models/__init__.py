"""Real base models (diffusers); the shapes world lives in zmagic_core.shapes.

MODEL_FACTORIES maps a model kind to its factory; diffusers is imported only when one is built.
"""
MODEL_FACTORIES: dict = {}
