"""The parsing energy built through the factory from a checkpoint in the public format."""
import pytest
import torch

from zmagic_core import BuildContext, ConfigError, InputError, WeightsNotFoundError, load_image
from zmagic_parsing.energy import BISENET_FILE, BISENET_URL, ParsingEnergy, build_parsing

SIZE = 64  # parsing resolution in tests (512 in real use)


def make(checkpoint, reference, **options):
    return build_parsing(BuildContext(), reference=str(reference), weights=str(checkpoint),
                         input_size=SIZE, **options)


@pytest.fixture(scope="module")
def energy(checkpoint, images):
    return make(checkpoint, images[0])


@pytest.fixture(scope="module")
def parser(energy):
    return energy.parser


def test_zero_at_reference_positive_elsewhere(energy, images):
    ref, other = (load_image(p) for p in images)
    alone = energy(ref.unsqueeze(0))
    assert alone.shape == (1,) and alone.item() <= 1e-6
    e = energy(torch.stack([ref, other, -ref]))
    assert e.shape == (3,)
    # Batched convolutions may round differently from the reference's own pass: zero up to float error.
    assert e[0].item() <= 1e-4 * e[1].item()
    assert e[1].item() > 1.0 and e[2].item() > 1.0
    assert not any(p.requires_grad for p in energy.parameters())
    assert not energy.parser.training


@pytest.mark.parametrize("distance,reduction", [("logits", "mse"), ("probabilities", "l2"),
                                                ("probabilities", "mse")])
def test_distance_variants(parser, images, distance, reduction):
    ref, other = (load_image(p) for p in images)
    e = ParsingEnergy(parser, ref, input_size=SIZE, distance=distance, reduction=reduction)
    values = torch.cat([e(ref.unsqueeze(0)), e(other.unsqueeze(0))])
    assert values[0].item() <= 1e-6 * values[1].item() and values[1].item() > 0
    if distance == "probabilities":
        assert e.target.sum(1).allclose(torch.ones(1, SIZE, SIZE))


def test_mse_is_squared_l2_over_elements(parser, images, energy):
    other = load_image(images[1]).unsqueeze(0)
    mse = ParsingEnergy(parser, load_image(images[0]), input_size=SIZE, reduction="mse")(other)
    l2 = energy(other)
    assert torch.allclose(mse, l2.pow(2) / (19 * SIZE * SIZE), rtol=1e-4)


def test_gradients_are_finite_and_informative(energy, images):
    ref, other = (load_image(p) for p in images)
    x = torch.stack([ref, other]).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    assert torch.isfinite(grad).all()
    assert grad[1].abs().max() > 0
    # A small step down the gradient lowers the energy.
    with torch.no_grad():
        stepped = other - 1e-3 * grad[1] / grad[1].norm() * other.numel() ** 0.5
        assert energy(stepped.unsqueeze(0)).item() < energy(other.unsqueeze(0)).item()


def test_double_backward(energy, images):
    x = load_image(images[1]).unsqueeze(0).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().max() > 0


def test_images_of_another_size_than_the_reference(energy):
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    e = energy(x)
    assert e.shape == (2,) and torch.isfinite(e).all() and (e > 0).all()


def test_mse_gradient_vanishes_at_the_reference(parser, images):
    ref, other = (load_image(p) for p in images)
    e = ParsingEnergy(parser, ref, input_size=SIZE, reduction="mse")
    x = torch.stack([ref, other]).requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.cat([e(x[:1]), e(x[1:])]).sum(), x)
    assert grad[0].abs().max() <= 1e-6 * grad[1].abs().max()


def test_reference_must_be_one_image(parser):
    with pytest.raises(InputError, match="one RGB image"):
        ParsingEnergy(parser, torch.zeros(2, 3, 8, 8), input_size=SIZE)


# -- errors raised at build time --------------------------------------------------------------
def test_missing_checkpoint_names_file_and_source(images, tmp_path):
    missing = tmp_path / "nowhere" / BISENET_FILE
    with pytest.raises(WeightsNotFoundError) as info:
        make(missing, images[0])
    msg = str(info.value)
    assert str(missing) in msg and BISENET_URL in msg


def test_default_search_reports_where_it_looked(images, tmp_path, monkeypatch):
    monkeypatch.delenv("ZMAGIC_PARSING_WEIGHTS", raising=False)
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:
        build_parsing(BuildContext(), reference=str(images[0]), input_size=SIZE)
    msg = str(info.value)
    assert str(tmp_path / "weights" / BISENET_FILE) in msg
    assert str(tmp_path / "home" / ".cache" / "zmagic" / "weights" / BISENET_FILE) in msg
    assert BISENET_URL in msg


def test_default_search_finds_checkpoint_in_weights_dir(images, checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("ZMAGIC_PARSING_WEIGHTS", raising=False)
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(checkpoint.parent))
    e = build_parsing(BuildContext(), reference=str(images[0]), input_size=SIZE)
    assert e(load_image(images[0]).unsqueeze(0)).item() == 0.0


def test_checkpoint_from_environment(images, checkpoint, monkeypatch):
    monkeypatch.setenv("ZMAGIC_PARSING_WEIGHTS", str(checkpoint))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", "/nonexistent")
    e = build_parsing(BuildContext(), reference=str(images[0]), input_size=SIZE)
    assert isinstance(e, ParsingEnergy)


@pytest.mark.parametrize("name", ["face-parsing/79999_iter.pth", "79999_iter.safetensors"])
def test_default_search_finds_the_other_file_names(images, net, tmp_path, monkeypatch, name):
    from safetensors.torch import save_file

    path = tmp_path / "weights" / name
    path.parent.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    monkeypatch.delenv("ZMAGIC_PARSING_WEIGHTS", raising=False)
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    e = build_parsing(BuildContext(), reference=str(images[0]), input_size=SIZE)
    assert e(load_image(images[0]).unsqueeze(0)).item() == 0.0


def test_missing_checkpoint_from_environment_says_so(images, tmp_path, monkeypatch):
    monkeypatch.setenv("ZMAGIC_PARSING_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"gone\.pth does not exist.*ZMAGIC_PARSING_WEIGHTS") as info:
        build_parsing(BuildContext(), reference=str(images[0]), input_size=SIZE)
    assert BISENET_URL in str(info.value)


def test_missing_reference(checkpoint, tmp_path):
    with pytest.raises(InputError, match="not found"):
        make(checkpoint, tmp_path / "no-face.png")


def test_unreadable_reference(checkpoint, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot read image"):
        make(checkpoint, bad)


def test_corrupt_checkpoint(images, tmp_path):
    bad = tmp_path / BISENET_FILE
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match="BiSeNet face-parsing checkpoint: cannot read weights file"):
        make(bad, images[0])


def test_checkpoint_of_another_network(images, tmp_path):
    other = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, other)
    with pytest.raises(InputError, match="resnet18.pth does not fit the BiSeNet face-parsing") as info:
        make(other, images[0])
    assert "missing cp.resnet." in str(info.value) and "unexpected conv1.weight, fc.weight" in str(info.value)
    assert len(str(info.value)) < 600  # a summary, not 190 key names


def test_unknown_option_is_a_config_error(checkpoint, images):
    with pytest.raises(ConfigError, match="distanse"):
        make(checkpoint, images[0], distanse="logits")
    with pytest.raises(ConfigError, match="distance"):
        make(checkpoint, images[0], distance="cosine")
