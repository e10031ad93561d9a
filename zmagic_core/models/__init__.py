"""Layer 3, base models: the embedded shapes world (:mod:`.shapes`) and pretrained diffusers
models (:mod:`.pretrained`). Each implements the DiffusionModel contract."""
