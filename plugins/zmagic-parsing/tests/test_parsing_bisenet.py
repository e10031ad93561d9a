"""The BiSeNet architecture matches the public 79999_iter.pth state-dict format exactly."""
import pytest
import torch

from zmagic_core import InputError, WeightsNotFoundError
from zmagic_parsing.bisenet import BiSeNet, load_bisenet


def _conv(name, out_c, in_c, k):
    return {f"{name}.weight": (out_c, in_c, k, k)}


def _bn(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


def _conv_bn_relu(name, out_c, in_c, k):
    return {**_conv(f"{name}.conv", out_c, in_c, k), **_bn(f"{name}.bn", out_c)}


def expected_format(n_classes=19):
    """Key -> shape of zllrunning/face-parsing.PyTorch's BiSeNet, written out from its layout."""
    keys = {**_conv("cp.resnet.conv1", 64, 3, 7), **_bn("cp.resnet.bn1", 64)}
    chans = {1: (64, 64), 2: (64, 128), 3: (128, 256), 4: (256, 512)}
    for layer, (c_in, c_out) in chans.items():
        for block in (0, 1):
            p = f"cp.resnet.layer{layer}.{block}"
            first_in = c_in if block == 0 else c_out
            keys.update(_conv(f"{p}.conv1", c_out, first_in, 3))
            keys.update(_bn(f"{p}.bn1", c_out))
            keys.update(_conv(f"{p}.conv2", c_out, c_out, 3))
            keys.update(_bn(f"{p}.bn2", c_out))
            if block == 0 and layer > 1:
                keys.update(_conv(f"{p}.downsample.0", c_out, c_in, 1))
                keys.update(_bn(f"{p}.downsample.1", c_out))
    for arm, c_in in (("arm16", 256), ("arm32", 512)):
        keys.update(_conv_bn_relu(f"cp.{arm}.conv", 128, c_in, 3))
        keys.update(_conv(f"cp.{arm}.conv_atten", 128, 128, 1))
        keys.update(_bn(f"cp.{arm}.bn_atten", 128))
    keys.update(_conv_bn_relu("cp.conv_head32", 128, 128, 3))
    keys.update(_conv_bn_relu("cp.conv_head16", 128, 128, 3))
    keys.update(_conv_bn_relu("cp.conv_avg", 128, 512, 1))
    keys.update(_conv_bn_relu("ffm.convblk", 256, 256, 1))
    keys.update(_conv("ffm.conv1", 64, 256, 1))
    keys.update(_conv("ffm.conv2", 256, 64, 1))
    for head, c_in, mid in (("conv_out", 256, 256), ("conv_out16", 128, 64), ("conv_out32", 128, 64)):
        keys.update(_conv_bn_relu(f"{head}.conv", mid, c_in, 3))
        keys.update(_conv(f"{head}.conv_out", n_classes, mid, 1))
    return keys


def test_state_dict_has_exactly_the_public_keys_and_shapes():
    got = {k: tuple(v.shape) for k, v in BiSeNet(19).state_dict().items()}
    want = expected_format(19)
    assert set(got) - set(want) == set(), "keys the public checkpoint does not have"
    assert set(want) - set(got) == set(), "public checkpoint keys the model lacks"
    assert got == want
    # 13.30 M parameters + BatchNorm statistics: ~53.3 MB of float32, the size of the public file.
    assert sum(p.numel() for p in BiSeNet(19).parameters()) == 13_300_416


def test_saved_state_dict_reloads_strictly_with_same_outputs(net, checkpoint):
    fresh = BiSeNet(19)
    fresh.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    fresh.eval()
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        outs = fresh(x)
        assert len(outs) == 3
        for a, b in zip(net(x), outs):
            assert a.shape == (1, 19, 48, 48)
            assert torch.equal(a, b)
        assert torch.equal(net.logits(x), outs[0])


def test_loader_accepts_dataparallel_prefix_and_missing_batch_counters(net, tmp_path):
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    loaded = load_bisenet(path)
    assert not loaded.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), net.logits(x))


def test_loader_reads_safetensors(net, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "79999_iter.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_bisenet(path).logits(x), net.logits(x))


def test_loader_is_strict_about_foreign_checkpoints(net, tmp_path):
    state = dict(net.state_dict())
    del state["conv_out.conv_out.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(InputError,
                       match=r"partial\.pth does not fit the BiSeNet face-parsing .*: missing conv_out\.conv_out\.weight$"):
        load_bisenet(path)
    state["conv_out.conv_out.weight"] = torch.zeros(5, 256, 1, 1)  # a 5-class head
    torch.save(state, path)
    with pytest.raises(InputError, match=r"partial\.pth does not fit .*: wrong shape conv_out\.conv_out\.weight \(file \(5, 256, 1, 1\), model \(19, 256, 1, 1\)\)$"):
        load_bisenet(path)


def test_loader_reports_a_missing_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        load_bisenet(tmp_path / "nowhere.pth")


def test_loader_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "object": _Unsafe()}, path)
    with pytest.raises(InputError, match="cannot read weights file .*evil.pth") as info:
        load_bisenet(path)
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value)


class _Unsafe:
    pass
