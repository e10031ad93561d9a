"""The SegFormer backend with a tiny model saved by save_pretrained and loaded offline."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from zmagic_core import BuildContext, ConfigError, InputError, WeightsNotFoundError, load_image
from zmagic_parsing.energy import ParsingEnergy, build_parsing, build_segformer_parser  # noqa: E402


@pytest.fixture(scope="module")
def tiny_segformer(tmp_path_factory):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=19)
    model = SegformerForSemanticSegmentation(config).eval()
    folder = tmp_path_factory.mktemp("segformer")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the variable, and the constant huggingface_hub read from it when first imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def build(folder, reference, **options):
    return build_parsing(BuildContext(), reference=str(reference), backbone="segformer",
                         weights=str(folder), input_size=64, **options)


def test_round_trip_matches_the_saved_model(tiny_segformer, images):
    folder, model = tiny_segformer
    energy = build(folder, images[0])
    assert isinstance(energy, ParsingEnergy)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(energy.parser(x), model(pixel_values=x).logits, rtol=1e-4, atol=1e-6)
    assert energy.target.shape == (1, 19, 16, 16)


def test_energy_zero_at_reference_and_differentiable(tiny_segformer, images):
    energy = build(tiny_segformer[0], images[0], distance="probabilities")
    ref, other = (load_image(p) for p in images)
    assert energy(ref.unsqueeze(0)).item() <= 1e-6
    x = other.unsqueeze(0).requires_grad_(True)
    e = energy(x)
    assert e.item() > 0
    (grad,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    (second,) = torch.autograd.grad(grad.pow(2).sum(), x)  # double backward (eager attention)
    assert torch.isfinite(second).all()


def test_unknown_model_offline_is_weights_not_found(images, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no-such/face-parser"):
        build("no-such/face-parser", images[0])
    with pytest.raises(WeightsNotFoundError, match="folder"):
        build(tmp_path, images[0])  # an empty folder: no config.json


def test_a_file_is_not_a_segformer_checkpoint(images, checkpoint):
    from zmagic_core.assembly.build import find_problems

    with pytest.raises(ConfigError, match="save_pretrained folder"):
        build(checkpoint, images[0])
    with pytest.raises(InputError, match="save_pretrained folder"):
        build_segformer_parser(str(checkpoint))
    condition = {"kind": "parsing", "reference": str(images[0]), "backbone": "segformer", "weights": str(checkpoint)}
    (found,) = find_problems({"model": {"kind": "shapes", "size": 32}, "conditions": [condition], "device": "cpu"})
    assert found.startswith("conditions.0.options: Value error, weights: the segformer backbone needs"), found


def test_hub_id_not_cached_fails_at_once_when_the_hub_is_unreachable(images, monkeypatch):
    """Not cached, not offline, hub unreachable: one line naming the id and the folder way, no download tries."""
    import huggingface_hub.constants
    from transformers import SegformerForSemanticSegmentation

    import zmagic_parsing.energy as energy

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real, tries = SegformerForSemanticSegmentation.from_pretrained, []

    def from_pretrained(name, **kwargs):
        tries.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only"):
            raise OSError("a download was tried")  # never the network in a test
        return real(name, **kwargs)

    monkeypatch.setattr(SegformerForSemanticSegmentation, "from_pretrained", from_pretrained)
    monkeypatch.setattr(energy, "unreachable", lambda *a, **k: "huggingface.co cannot be reached (test)")
    with pytest.raises(WeightsNotFoundError) as info:
        build("no-such/face-parser", images[0])
    message = str(info.value)
    assert "'no-such/face-parser'" in message and "cannot be reached" in message and "--local-dir" in message
    assert "\n" not in message and tries == [True]
    monkeypatch.setattr(energy, "unreachable", lambda *a, **k: None)  # reachable: the download is tried
    with pytest.raises(WeightsNotFoundError, match="a download was tried"):
        build("no-such/face-parser", images[0])
    assert tries == [True, True, False]
