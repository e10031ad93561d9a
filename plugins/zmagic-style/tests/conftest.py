"""Tiny models of the real architectures (random weights) saved in the real formats, and images."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from zmagic_core.testing import one_thread  # noqa: F401  (autouse)

TINY_CLIP_CONFIG = {  # 3 vision blocks, so the default block 2 (FreeDoM's) exists
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "zmagic-style-tiny-clip-test"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config path, .safetensors checkpoint, .pt checkpoint, the original model)."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-clip")
    config = root / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "clip.safetensors"))
    torch.save(state, root / "clip.pt")
    return config, root / "clip.safetensors", root / "clip.pt", model


@pytest.fixture(scope="session")
def vgg_weights(tmp_path_factory):
    """VGG19 conv weights (torchvision's init), saved as features-only safetensors and as a
    torchvision-style torch state dict (``features.N.*`` keys)."""
    from safetensors.torch import save_file
    from zmagic_style import vgg19_features

    root = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    feats = vgg19_features(29)  # up to relu5_1
    for m in feats.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    state = {k: v.contiguous() for k, v in feats.state_dict().items()}
    save_file(state, str(root / "vgg19-features.safetensors"))
    torch.save({f"features.{k}": v for k, v in state.items()}, root / "vgg19-torchvision.pth")
    return root / "vgg19-features.safetensors", root / "vgg19-torchvision.pth", state


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """Reference, the same picture shifted (same style, other layout), and an unrelated picture."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("pictures")
    ref = data.astronaut()[::4, ::4]  # 128 x 128
    Image.fromarray(np.ascontiguousarray(ref)).save(root / "reference.png")
    Image.fromarray(np.ascontiguousarray(np.roll(ref, 32, axis=1))).save(root / "shifted.png")
    other = data.coffee()[:400:3, 100:500:3]
    Image.fromarray(np.ascontiguousarray(other)).save(root / "other.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    return root

