"""The 68-point backbone: face-alignment's FAN class with a tiny checkpoint (FAN(1), run at 64 px
to keep the test fast; the real 2DFAN-4 is FAN(4) at 256), loaded through the plugin's path."""
import pytest
import torch

from zmagic_core import BuildContext, InputError, WeightsNotFoundError, load_image
from zmagic_landmark.energy import build_landmark
from zmagic_faceid import detect_face
from zmagic_landmark.networks import soft_argmax

CTX = BuildContext()


def test_soft_argmax_finds_a_peak_and_is_differentiable():
    hm = torch.zeros(1, 2, 64, 64)
    hm[0, 0, 10, 20] = 1.0
    hm[0, 1, 63, 0] = 1.0
    hm.requires_grad_(True)
    pts = soft_argmax(hm, temperature=0.01)
    assert torch.allclose(pts[0], torch.tensor([[20.5 / 64, 10.5 / 64], [0.5 / 64, 63.5 / 64]]), atol=1e-4)
    soft = soft_argmax(hm, temperature=1e3)  # nearly uniform: the centre
    assert torch.allclose(soft, torch.full_like(soft, 0.5), atol=1e-2)
    (grad,) = torch.autograd.grad(soft_argmax(hm, 0.5).sum(), hm)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_fan_checkpoint_loads_and_gives_a_68_point_energy(tiny_fan, astronaut_png, other_png):
    path, model = tiny_fan
    energy = build_landmark(CTX, reference=str(astronaut_png), backbone="fan", weights=str(path),
                            fan_modules=1, fan_input_size=64)
    for key, value in model.state_dict().items():
        assert torch.equal(energy.net.net.state_dict()[key], value), key
    # face-alignment's crop convention: a square of side 200 (w + h) / 195 around the face box, moved up
    x0, y0, x1, y1 = energy.box
    fx0, fy0, fx1, fy1 = detect_face(load_image(astronaut_png, 256))[0]
    fw, fh = fx1 - fx0, fy1 - fy0
    assert x1 - x0 == pytest.approx(200 * (fw + fh) / 195) and y1 - y0 == pytest.approx(x1 - x0)
    assert (x0 + x1) / 2 == pytest.approx((fx0 + fx1) / 2)
    assert (y0 + y1) / 2 == pytest.approx((fy0 + fy1) / 2 - 0.12 * fh)
    assert energy.target.shape == (68, 2)
    ref = load_image(astronaut_png, 256).unsqueeze(0)
    images = torch.cat([ref, load_image(other_png, 256).unsqueeze(0)]).requires_grad_(True)
    e = energy(images)
    assert e[0] < 1e-5 and e[1] > 1e-3
    (grad,) = torch.autograd.grad(e.sum(), images)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0


def test_fan_errors(tmp_path, monkeypatch, astronaut_png):
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth does not exist.*adrianbulat"):
        build_landmark(CTX, reference=str(astronaut_png), backbone="fan", weights=str(tmp_path / "nowhere.pth"))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsNotFoundError, match=r"2DFAN4-11f355bf06\.pth\.tar.*looked in"):
        build_landmark(CTX, reference=str(astronaut_png), backbone="fan", download=False)
    five = tmp_path / "five.json"
    five.write_text("[[0.1, 0.2], [0.3, 0.2], [0.2, 0.3], [0.1, 0.4], [0.3, 0.4]]")
    with pytest.raises(InputError, match=r"shape \(5, 2\).*\(68, 2\)"):
        build_landmark(CTX, points=str(five), backbone="fan")
    onet_as_fan = tmp_path / "onet.pth"
    from zmagic_landmark.networks import onet_weights_path
    onet_as_fan.write_bytes(onet_weights_path().read_bytes())
    with pytest.raises(InputError, match="does not fit the face-alignment FAN"):
        build_landmark(CTX, reference=str(astronaut_png), backbone="fan", weights=str(onet_as_fan), fan_modules=1)


def test_example_docs_name_the_folder_fan_is_looked_up_in(monkeypatch, tmp_path):
    from pathlib import Path

    from zmagic_core import search_dirs

    faces = Path(__file__).resolve().parents[3] / "examples" / "faces"
    if not faces.is_dir():
        pytest.skip("not run from the zmagic repository")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert tmp_path / "hub" / "checkpoints" in search_dirs()
    for doc in (faces / "README.md", faces / "id_landmark.yaml"):
        text = doc.read_text()
        assert "$TORCH_HOME/hub/checkpoints" in text and "$TORCH_HOME/checkpoints" not in text, doc
