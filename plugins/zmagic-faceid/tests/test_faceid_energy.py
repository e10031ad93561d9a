import pytest
import torch

from zmagic_core import BuildContext, ConfigError, InputError, load_image
from zmagic_faceid.energy import build_faceid
from zmagic_faceid.faces import FREEDOM_BOX, crop_resize, detect_face, fixed_crop_256

CTX = BuildContext()


def test_mtcnn_finds_the_astronaut_face(astronaut_png):
    box, points, prob = detect_face(load_image(astronaut_png, 256))
    expected = torch.tensor([181, 62, 268, 172]) / 512
    assert torch.allclose(torch.tensor(box, dtype=torch.float32), expected, atol=8 / 512)
    assert points.shape == (5, 2) and prob > 0.99


def test_crop_resize_is_exact_on_pixel_aligned_boxes():
    img = torch.randn(2, 3, 64, 64)
    assert torch.allclose(crop_resize(img, (0, 0, 1, 1), 64), img, atol=1e-5)
    assert torch.allclose(crop_resize(img, (0.25, 0.25, 0.75, 0.75), 32), img[:, :, 16:48, 16:48], atol=1e-5)
    # outside the image: black (-1)
    out = crop_resize(img, (-1.0, 0, 0, 1), 8)
    assert torch.allclose(out, torch.full_like(out, -1.0))


def test_freedom_crop_matches_the_slicing_of_freedom():
    img = torch.randn(1, 3, 256, 256)
    expected = torch.nn.functional.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], (112, 112))
    assert torch.equal(fixed_crop_256(img, 112), expected)
    assert FREEDOM_BOX == (32 / 256, 35 / 256, 220 / 256, 223 / 256)


def test_energy_zero_on_reference_larger_elsewhere_with_finite_gradients(tiny_options, astronaut_png, other_png):
    energy = build_faceid(CTX, **tiny_options)
    ref = load_image(astronaut_png, 256).unsqueeze(0)
    other = load_image(other_png, 256).unsqueeze(0)
    noise = torch.rand(1, 3, 256, 256) * 2 - 1
    images = torch.cat([ref, other, noise]).requires_grad_(True)
    e = energy(images)
    assert e.shape == (3,) and (e >= 0).all()
    assert e[0] < 1e-5
    assert e[1] > 100 * e[0] + 1e-3 and e[2] > 100 * e[0] + 1e-3
    (grad,) = torch.autograd.grad(e.sum(), images)
    assert torch.isfinite(grad).all()
    assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_energy_only_looks_inside_the_reference_box(tiny_options, astronaut_png):
    energy = build_faceid(CTX, **tiny_options).train()  # train mode must not touch the BatchNorm statistics
    assert not energy.backbone.training
    ref = load_image(astronaut_png, 256).unsqueeze(0)
    outside = ref.clone()
    outside[:, :, 200:, :] = 1.0  # the face box is in the upper half
    assert energy(outside)[0] < 1e-5
    inside = ref.clone()
    inside[:, :, 40:90, 90:135] = 1.0  # over the face
    assert energy(inside)[0] > 1e-3


def test_l2_distance_and_freedom_crop(tiny_options, astronaut_png, other_png):
    energy = build_faceid(CTX, **tiny_options, crop="freedom", distance="l2")
    assert energy.box is None
    ref = load_image(astronaut_png, 256).unsqueeze(0)
    other = load_image(other_png, 256).unsqueeze(0)
    e = energy(torch.cat([ref, other]))
    assert e[0] < 1e-5 and e[1] > 1e-2


def test_explicit_box_skips_detection(tiny_options, grey_png):
    opts = {**tiny_options, "reference": str(grey_png), "box": [0.25, 0.25, 0.75, 0.75], "check_face": False,
            "margin": 0.0}
    energy = build_faceid(CTX, **opts)
    assert energy.box == pytest.approx((0.25, 0.25, 0.75, 0.75))


def test_missing_reference_names_the_file(tiny_options, tmp_path):
    missing = tmp_path / "nobody.png"
    with pytest.raises(InputError, match="nobody.png"):
        build_faceid(CTX, **{**tiny_options, "reference": str(missing)})


def test_unreadable_reference_names_the_file(tiny_options, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(InputError, match="broken.png"):
        build_faceid(CTX, **{**tiny_options, "reference": str(bad)})


def test_reference_without_a_face_names_the_file(tiny_options, grey_png):
    with pytest.raises(InputError, match=r"no face found.*grey\.png"):
        build_faceid(CTX, **{**tiny_options, "reference": str(grey_png)})


def test_bad_options_are_config_errors(tiny_options):
    with pytest.raises(ConfigError, match="colour"):
        build_faceid(CTX, **tiny_options, colour="red")
    with pytest.raises(ConfigError, match="crop"):
        build_faceid(CTX, **{**tiny_options, "crop": "middle"})
    with pytest.raises(ConfigError, match="box"):
        build_faceid(CTX, **tiny_options, box=[0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="box"):
        build_faceid(CTX, **tiny_options, crop="freedom", box=[0.1, 0.2, 0.3, 0.4])


def test_second_derivatives_exist_for_the_hessian_combiner(tiny_options):
    energy = build_faceid(CTX, **tiny_options)
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
