"""Checkpoint formats: the full IR-SE50 layout with the public key names, tiny models saved in the
real format and loaded back through the plugin's loading path, facenet checkpoints, clear errors."""
import pytest
import torch

from zmagic_core import BuildContext, InputError, WeightsNotFoundError
from zmagic_faceid.energy import FaceIDOptions, build_backbone, build_faceid
from zmagic_faceid.irse import IRSEBackbone, ir_se50

CTX = BuildContext()


def test_full_ir_se50_checkpoint_with_public_key_names_round_trips_strictly(tmp_path, astronaut_png):
    model = ir_se50().eval()
    state = model.state_dict()
    # key names of model_ir_se50.pth (TreB1eN/InsightFace_Pytorch Backbone(50, 0.6, 'ir_se'))
    for key in ["input_layer.0.weight", "input_layer.1.running_var", "input_layer.2.weight",
                "body.0.res_layer.0.weight", "body.0.res_layer.1.weight", "body.0.res_layer.2.weight",
                "body.0.res_layer.3.weight", "body.0.res_layer.4.running_mean",
                "body.0.res_layer.5.fc1.weight", "body.0.res_layer.5.fc2.weight",
                "body.3.shortcut_layer.0.weight", "body.3.shortcut_layer.1.running_mean",
                "body.7.shortcut_layer.0.weight", "body.21.shortcut_layer.0.weight",
                "body.23.res_layer.5.fc2.weight", "output_layer.0.weight", "output_layer.3.weight",
                "output_layer.3.bias", "output_layer.4.running_var"]:
        assert key in state, key
    units = {k.split(".")[1] for k in state if k.startswith("body.")}
    assert units == {str(i) for i in range(24)}  # 3 + 4 + 14 + 3
    shortcuts = sorted({int(k.split(".")[1]) for k in state if ".shortcut_layer." in k})
    assert shortcuts == [3, 7, 21]  # unit 0 keeps 64 channels: a parameter-free MaxPool2d(1, 2)
    assert state["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert state["body.0.res_layer.5.fc1.weight"].shape == (4, 64, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 43_797_696

    # as saved by the original repository: a plain state dict, without BatchNorm counters (torch 0.4)
    saved = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model_ir_se50.pth"
    torch.save(saved, path)
    loaded = build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path)))
    for key, value in loaded.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    with torch.no_grad():
        emb = loaded(torch.rand(1, 3, 112, 112) * 2 - 1)
    assert emb.shape == (1, 512) and torch.allclose(emb.norm(dim=1), torch.ones(1), atol=1e-5)


def test_tiny_checkpoint_loads_back_identically(tiny_arcface, tiny_arch, astronaut_png):
    path, model = tiny_arcface
    loaded = build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path),
                                          **tiny_arch))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_and_dataparallel_prefix(tmp_path, tiny_arcface, tiny_arch, astronaut_png):
    from safetensors.torch import save_file

    _, model = tiny_arcface
    path = tmp_path / "arcface.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path),
                                          **tiny_arch))
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, tiny_arch, astronaut_png):
    path = tmp_path / "model_ir_se50.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InputError, match=r"does not fit the ArcFace IR-SE architecture: missing input_layer"):
        build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path),
                                     **tiny_arch))
    wrong = IRSEBackbone([1, 1, 1, 1], [16, 16, 32, 64]).state_dict()
    torch.save(wrong, path)
    with pytest.raises(InputError, match="wrong shape"):
        build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path),
                                     **tiny_arch))


def test_pickled_code_is_refused(tmp_path, astronaut_png):
    path = tmp_path / "model_ir_se50.pth"
    torch.save({"weights": torch.nn.Linear(2, 2)}, path)  # a pickled module, not tensors
    with pytest.raises(InputError, match="cannot read weights file"):
        build_backbone(FaceIDOptions(reference=str(astronaut_png), weights=str(path)))


def test_missing_weights_say_what_where_and_how_to_get_them(tmp_path, monkeypatch, astronaut_png):
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth does not exist.*InsightFace_Pytorch"):
        build_faceid(CTX, reference=str(astronaut_png), weights=str(tmp_path / "nowhere.pth"))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsNotFoundError) as err:
        build_faceid(CTX, reference=str(astronaut_png))
    message = str(err.value)
    assert "model_ir_se50.pth" in message and str(tmp_path / "weights") in message
    assert "pixel2style2pixel" in message
    with pytest.raises(WeightsNotFoundError) as err:
        build_faceid(CTX, reference=str(astronaut_png), backbone="facenet", download=False)
    assert "20180402-114759-vggface2.pt" in str(err.value) and "github.com/timesler" in str(err.value)
