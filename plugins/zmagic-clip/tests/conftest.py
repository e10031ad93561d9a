"""A tiny open_clip model of the real architecture (random weights), saved in the real formats."""
import json

import pytest
import torch
from zmagic_core.testing import one_thread  # noqa: F401  (autouse)

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "zmagic-clip-tiny-test"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(config path, .pt checkpoint, .safetensors checkpoint, the original model)."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-clip")
    config = root / f"{TINY_NAME}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME, pretrained=None).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "tiny.pt")
    save_file(state, str(root / "tiny.safetensors"))
    return config, root / "tiny.pt", root / "tiny.safetensors", model

