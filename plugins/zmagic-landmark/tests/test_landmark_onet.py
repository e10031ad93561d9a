"""The five-point backbone with MTCNN's real O-Net weights on the astronaut face."""
import json

import numpy as np
import pytest
import torch

from zmagic_core import BuildContext, ConfigError, InputError, load_image
from zmagic_landmark.energy import build_landmark
from zmagic_faceid import detect_face

CTX = BuildContext()


@pytest.fixture(scope="module")
def energy(astronaut_png):
    return build_landmark(CTX, reference=str(astronaut_png))


@pytest.fixture(scope="module")
def reference(astronaut_png):
    return load_image(astronaut_png, 256).unsqueeze(0)


def test_onet_on_the_reference_crop_agrees_with_mtcnn(energy, reference):
    _, mtcnn_points, _ = detect_face(reference[0])
    ours = energy.points(reference)[0] * 256
    assert ours.shape == (5, 2)
    # the same network on (almost) the same crop: within 2 pixels of MTCNN's own landmarks
    assert (ours - torch.tensor(mtcnn_points, dtype=torch.float32)).norm(dim=1).max() < 2.0


def test_energy_zero_on_reference_and_follows_a_shift(energy, reference, other_png):
    shifted = torch.roll(reference, shifts=8, dims=-1)  # every landmark moves 8 px right
    other = load_image(other_png, 256).unsqueeze(0)
    images = torch.cat([reference, shifted, other]).requires_grad_(True)
    e = energy.train()(images)  # train mode must not change the network
    assert not energy.net.training
    assert e.shape == (3,) and (e >= 0).all()
    assert e[0] < 1e-5
    expected = 5 ** 0.5 * 8 / 256  # ||P - P*|| for five points each moved 8/256
    assert float(e[1].detach()) == pytest.approx(expected, rel=0.15)
    assert e[2] > 0.02
    (grad,) = torch.autograd.grad(e.sum(), images)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_points_file_targets_json_npy_and_pixels(tmp_path, energy, reference):
    target = energy.target.numpy()
    shifted = target + np.array([0.02, 0.0])
    as_json = tmp_path / "points.json"
    as_json.write_text(json.dumps(shifted.tolist()))
    as_npy = tmp_path / "points.npy"
    np.save(as_npy, shifted)
    in_pixels = tmp_path / "pixels.json"
    in_pixels.write_text(json.dumps({"points": (shifted * [512, 512]).tolist(), "width": 512, "height": 512}))
    for path in (as_json, as_npy, in_pixels):
        e = build_landmark(CTX, points=str(path), box=list(energy.box))
        assert torch.allclose(e.target, torch.tensor(shifted, dtype=torch.float32), atol=1e-6)
        assert float(e(reference)[0]) == pytest.approx(5 ** 0.5 * 0.02, rel=1e-3)
    np.save(tmp_path / "px.npy", shifted * 300)
    npy_pixels = build_landmark(CTX, points=str(tmp_path / "px.npy"), points_size=[300, 300], box=list(energy.box))
    assert torch.allclose(npy_pixels.target, torch.tensor(shifted, dtype=torch.float32), atol=1e-6)


def test_points_file_without_a_box_guesses_one_around_the_points(tmp_path, energy):
    path = tmp_path / "points.json"
    path.write_text(json.dumps(energy.target.tolist()))
    e = build_landmark(CTX, points=str(path))
    x0, y0, x1, y1 = e.box
    pts = energy.target
    assert x0 < pts[:, 0].min() and x1 > pts[:, 0].max() and y0 < pts[:, 1].min() and y1 > pts[:, 1].max()
    # close to the MTCNN-derived box of the reference (same face)
    assert np.allclose(e.box, energy.box, atol=0.06)


def test_wrong_points_shape_and_bad_files_are_input_errors(tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(np.zeros((68, 2)).tolist()))
    with pytest.raises(InputError, match=r"wrong\.json holds shape \(68, 2\).*\(5, 2\)"):
        build_landmark(CTX, points=str(wrong))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(10))
    with pytest.raises(InputError, match=r"shape \(10,\)"):
        build_landmark(CTX, points=str(flat))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(InputError, match="cannot read points file.*garbage.json"):
        build_landmark(CTX, points=str(garbage))
    pixels = tmp_path / "pixels.json"
    pixels.write_text(json.dumps((np.ones((5, 2)) * 200).tolist()))
    with pytest.raises(InputError, match="look like pixels"):
        build_landmark(CTX, points=str(pixels))
    with pytest.raises(InputError, match="points file not found.*missing.json"):
        build_landmark(CTX, points=str(tmp_path / "missing.json"))


def test_reference_errors_name_the_file(tmp_path, grey_png):
    with pytest.raises(InputError, match="nobody.png"):
        build_landmark(CTX, reference=str(tmp_path / "nobody.png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png"):
        build_landmark(CTX, reference=str(bad))
    with pytest.raises(InputError, match=r"no face found.*grey\.png"):
        build_landmark(CTX, reference=str(grey_png))


def test_option_errors(astronaut_png, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        build_landmark(CTX)
    with pytest.raises(ConfigError, match="exactly one of"):
        build_landmark(CTX, reference=str(astronaut_png), points=str(tmp_path / "p.json"))
    with pytest.raises(ConfigError, match="backbone"):
        build_landmark(CTX, reference=str(astronaut_png), backbone="dlib")
    with pytest.raises(ConfigError, match="scale: Extra inputs are not permitted"):
        build_landmark(CTX, reference=str(astronaut_png), scale=3)


def test_second_derivatives_exist_for_the_hessian_combiner(energy):
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
