"""zmagic_core.files.weights: where weight files are looked for, what is read, and the errors."""
import pytest
import torch
from torch import nn

from zmagic_core.contracts.errors import InputError, WeightsNotFoundError
from zmagic_core.files.weights import WEIGHTS_DIR_ENV, find_weights, load_strict, read_state_dict, search_dirs


@pytest.fixture
def places(tmp_path, monkeypatch):
    """$ZMAGIC_WEIGHTS_DIR, ~/.cache/zmagic/weights and the torch hub checkpoints under tmp_path."""
    env, home, hub = tmp_path / "env", tmp_path / "home", tmp_path / "torch"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(env))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(hub))
    return env, home / ".cache" / "zmagic" / "weights", hub / "hub" / "checkpoints"


def _put(folder, name="w.pt"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"a": torch.zeros(1)}, folder / name)
    return folder / name


def test_search_order(places, tmp_path):
    env, cache, hub = places
    assert search_dirs() == [env, cache, hub]
    for folder in (hub, cache, env):
        _put(folder)
        assert find_weights("tiny", "w.pt", None, "get it") == folder / "w.pt"  # the earlier folder wins
    explicit = _put(tmp_path / "elsewhere")
    assert find_weights("tiny", "w.pt", str(explicit), "get it") == explicit


def test_missing_file_names_every_place_searched(places, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        find_weights("tiny net", "w.pt", None, "Ask the authors.")
    message = str(info.value)
    assert "tiny net" in message and "Ask the authors." in message and WEIGHTS_DIR_ENV in message
    for folder in places:
        assert str(folder / "w.pt") in message
    with pytest.raises(WeightsNotFoundError, match="nowhere.pt does not exist"):
        find_weights("tiny net", "w.pt", str(tmp_path / "nowhere.pt"), "Ask the authors.")


def test_download_into_torch_hub_and_failed_download(places, monkeypatch):
    import zmagic_core.files.weights as weights

    env, cache, hub = places
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "unreachable", lambda url: None)  # http://x answers, for this test

    def fetch(url, target):
        torch.save({"a": torch.ones(1)}, target)

    assert find_weights("tiny", "w.pt", None, "", url="http://x/w.pt", download=True, downloader=fetch) == hub / "w.pt"

    def offline(url, target):
        raise OSError("no network")

    with pytest.raises(WeightsNotFoundError, match="Downloading http://x/v.pt failed .OSError: no network"):
        find_weights("tiny", "v.pt", None, "", url="http://x/v.pt", download=True, downloader=offline)

    # offline, or with the host silent, a download (whose library may wait forever) is not started
    monkeypatch.setattr(weights, "unreachable", lambda url: "x cannot be reached (timed out)")
    with pytest.raises(WeightsNotFoundError, match="Downloading http://x/u.pt was not tried: x cannot be reached"):
        find_weights("tiny", "u.pt", None, "", url="http://x/u.pt", download=True, downloader=fetch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="was not tried: offline mode is on"):
        find_weights("tiny", "u.pt", None, "", url="http://x/u.pt", download=True, downloader=fetch)
    assert not (hub / "u.pt").exists()


def test_safetensors_and_pt_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    state = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        net = load_strict(nn.Linear(2, 3), loaded, tmp_path / name, "Linear")
        assert torch.equal(net.weight, state["weight"])


class _Code:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Code()}, path)
    with pytest.raises(InputError, match="cannot read weights file"):
        read_state_dict(path)
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save({"weights": nn.Linear(2, 2)}, path)  # a pickled module, not tensors
    with pytest.raises(InputError, match="cannot read weights file") as err:
        read_state_dict(path)
    message = str(err.value)  # the reason, and never torch's advice to load with weights_only=False
    assert "pickled Python objects" in message and "Linear" in message and "False" not in message
    assert "\n" not in message and capsys.readouterr().err == ""  # no torch warnings above it


def test_a_folder_given_as_weights_is_named_as_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder; give the weights file itself"):
        read_state_dict(tmp_path)
    with pytest.raises(InputError, match="is a folder; give the weights file itself"):
        find_weights("ArcFace", "model_ir_se50.pth", str(tmp_path), "get it from ...")


def test_not_tensors_and_wrong_architecture(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"weight": [1, 2]}, path)
    with pytest.raises(InputError, match="does not hold a state dict of tensors"):
        read_state_dict(path)
    with pytest.raises(InputError, match=r"does not fit the Linear architecture: missing bias; wrong shape weight \(file \(2, 2\), model \(3, 2\)\)"):
        load_strict(nn.Linear(2, 3), {"weight": torch.zeros(2, 2)}, path, "Linear")
