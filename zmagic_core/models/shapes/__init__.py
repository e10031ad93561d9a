"""The shapes world: an embedded diffusion model with an exact score, its energies and evaluation."""
from zmagic_core.models.shapes.energies import AttributeEnergy, KeypointEnergy, MaskEnergy, StyleEnergy, reference_image
from zmagic_core.models.shapes.evaluate import evaluate_samples, target_log_weights
from zmagic_core.models.shapes.flow import ShapesFlowModel
from zmagic_core.models.shapes.world import ShapesModel, render

__all__ = ["ShapesModel", "ShapesFlowModel", "render", "AttributeEnergy", "MaskEnergy", "KeypointEnergy", "StyleEnergy",
           "reference_image", "evaluate_samples", "target_log_weights"]
