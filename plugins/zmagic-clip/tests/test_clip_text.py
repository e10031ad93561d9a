import pickle
import time

import pytest
import torch
import torch.nn.functional as F

from zmagic_core import BuildContext, ConfigError, InputError, WeightsNotFoundError, get_registry
from zmagic_clip import OPENAI_MEAN, OPENAI_STD, ClipTextEnergy, ClipTextOptions, build_clip_text

TINY_NAME = "zmagic-clip-tiny-test"  # as in conftest.py


def build(tiny, **options):
    config, pt, _, _ = tiny
    options.setdefault("prompt", "a photo of a red circle")
    options.setdefault("checkpoint", str(pt))
    return build_clip_text(BuildContext(), model_config=str(config), **options)


def images(n=3, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def reference_energy(model, x, prompt, distance):
    """The energy recomputed from the original (never saved) model, step by step."""
    import open_clip

    x = F.interpolate((x + 1) / 2, size=(64, 64), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_NAME)([prompt]))
    if distance == "cosine":
        return 1 - F.cosine_similarity(img, txt.expand_as(img), dim=1)
    return (txt - img).norm(dim=1)


def test_registry_finds_clip_text():
    reg = get_registry().get("energy", "clip-text")
    assert reg.factory is build_clip_text
    assert reg.options is ClipTextOptions


def test_options_are_checked_before_loading():
    with pytest.raises(Exception):
        ClipTextOptions.model_validate({})  # prompt is required
    with pytest.raises(Exception):
        ClipTextOptions.model_validate({"prompt": "x", "promt": "y"})
    with pytest.raises(Exception):
        ClipTextOptions.model_validate({"prompt": "x", "distance": "l1"})
    opts = ClipTextOptions.model_validate({"prompt": "x", "model_config": "/a.json"})
    assert opts.model_config_path == "/a.json"
    # a dump by field name validates again (a recipe layer may pass validated options back)
    ClipTextOptions.model_validate(opts.model_dump())
    with pytest.raises(ConfigError):
        build_clip_text(BuildContext(), prompt="x", distance="l1")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_round_trip_matches_the_original_model(tiny, fmt, distance):
    config, pt, st, model = tiny
    energy = build(tiny, checkpoint=str(pt if fmt == "pt" else st), distance=distance)
    x = images()
    with torch.no_grad():
        e = energy(x)
    assert e.shape == (3,) and (e >= 0).all()
    torch.testing.assert_close(e, reference_energy(model, x, "a photo of a red circle", distance),
                               rtol=1e-4, atol=1e-5)


def test_gradients_are_finite_and_twice_differentiable(tiny):
    energy = build(tiny)
    x = images(2, size=37).requires_grad_(True)  # odd, non-model size: resized inside
    (g,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    (h,) = torch.autograd.grad(g.pow(2).sum(), x)  # the Hessian term of the dependent combiner
    assert torch.isfinite(h).all()
    assert not any(p.requires_grad for p in energy.parameters())
    assert not energy.train().training and not energy.visual.training


def test_pretrained_may_be_a_file_path(tiny):
    _, _, st, _ = tiny
    a = build(tiny, checkpoint=None, pretrained=str(st))
    b = build(tiny)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_prompt_matters_and_descent_lowers_the_energy(tiny):
    e1, e2 = build(tiny, prompt="a red circle"), build(tiny, prompt="a blue square at the top")
    x = images(1, size=64)
    with torch.no_grad():
        assert not torch.allclose(e1(x), e2(x))
    # an image optimised for the prompt matches it better than where it started
    x = x.clone().requires_grad_(True)
    start = float(e1(x).detach())
    for _ in range(20):
        (g,) = torch.autograd.grad(e1(x).sum(), x)
        x = (x - 2.0 * g / g.norm()).detach().requires_grad_(True)
    assert float(e1(x)) < start - 0.01


def test_missing_checkpoint(tiny, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found.*nope.pt"):
        build(tiny, checkpoint=str(tmp_path / "nope.pt"))


def test_unreadable_checkpoint(tiny, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights file .*bad.pt"):
        build(tiny, checkpoint=str(bad))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="cannot read weights file .*bad.safetensors"):
        build(tiny, checkpoint=str(bad_st))


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tiny, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(InputError):
        build(tiny, checkpoint=str(path))


def test_checkpoint_of_another_model_is_a_config_error(tiny, tmp_path):
    _, pt, _, _ = tiny
    state = torch.load(pt, weights_only=True)
    state["visual.conv1.weight"] = state["visual.conv1.weight"][:32]
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        build(tiny, checkpoint=str(tmp_path / "other.pt"))


def test_missing_pretrained_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        build_clip_text(BuildContext(), prompt="x", cache_dir=str(tmp_path))  # ViT-B-16 / openai
    msg = str(info.value)
    assert time.monotonic() - start < 10
    assert "ViT-B-16" in msg and "openai" in msg and str(tmp_path) in msg
    assert "hf download timm/vit_base_patch16_clip_224.openai" in msg and "checkpoint:" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsNotFoundError, match="download: false"):
        build_clip_text(BuildContext(), prompt="x", cache_dir=str(tmp_path), download=False)


def test_bad_model_names_and_configs(tiny, tmp_path):
    with pytest.raises(ConfigError, match="no pretrained tag"):
        build_clip_text(BuildContext(), prompt="x", pretrained="no-such-tag", download=False)
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_clip_text(BuildContext(), prompt="x", model="ViT-Q-99", download=False)
    with pytest.raises(InputError, match="model_config not found"):
        build_clip_text(BuildContext(), prompt="x", model_config=str(tmp_path / "none.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_clip_text(BuildContext(), prompt="x", model_config=str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="registers the model"):
        build(tiny, model="ViT-B-16")


def test_guided_run_lowers_the_energy(tiny):
    from zmagic_core import SumCombiner
    from zmagic_core import Condition
    from zmagic_core import Pipeline
    from zmagic_core import ShapesModel
    from zmagic_core import DDPMSolver

    energy = build(tiny)
    world = ShapesModel(size=32)
    seeds = [0, 1, 2, 3]
    guided = Pipeline(world, DDPMSolver(), SumCombiner(),
                      [Condition("text", energy, rule="adaptive", scale=0.5)], steps=25)
    plain = Pipeline(world, DDPMSolver(), SumCombiner(), [], steps=25)
    g = guided.run(seeds=seeds, batch_size=4, progress=False)
    p = plain.run(seeds=seeds, batch_size=4, progress=False)
    assert not g.errors
    with torch.no_grad():
        eg, ep = energy(g.images), energy(p.images)
    # measured: guided ~0.74 vs plain ~1.0 per sample (scale 0.5); every sample must improve
    assert (eg < ep).all() and eg.mean() < ep.mean() - 0.05, (eg, ep)


def test_recipe_checks_and_builds_clip_text(tiny):
    from zmagic_core import build_pipeline, load_recipe

    config, pt, _, _ = tiny
    recipe = {
        "model": {"kind": "shapes", "size": 32},
        "solver": {"kind": "ddpm", "steps": 3},
        "conditions": [{"kind": "clip-text", "prompt": "a red circle", "model_config": str(config),
                        "checkpoint": str(pt), "distance": "l2", "rule": "adaptive", "scale": 0.5}],
        "num_samples": 1, "batch_size": 1, "device": "cpu",
    }
    pipeline = build_pipeline(recipe)
    energy = pipeline.conditions[0].energy
    assert isinstance(energy, ClipTextEnergy) and energy.distance == "l2"
    assert not pipeline.run(seeds=[0], batch_size=1, progress=False).errors
    # Z-Magic's dependent combiner with the Hessian term needs second derivatives through CLIP
    dependent = build_pipeline({**recipe, "combiner": {"kind": "dependent", "hessian": True},
                                "conditions": recipe["conditions"] + [
                                    {"kind": "shapes-attribute", "attribute": "color", "value": "red"}]})
    result = dependent.run(seeds=[0], batch_size=1, progress=False)
    assert not result.errors and torch.isfinite(result.images).all()
    assert not any("fallback" in rec for rec in result.trace[0])
    bad = {**recipe, "conditions": [{"kind": "clip-text", "promt": "typo"}]}
    with pytest.raises(ConfigError, match="promt"):
        load_recipe(bad)


def fake_hub_cache(root, repo_id, filename, source):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    import shutil

    folder = root / f"models--{repo_id.replace('/', '--')}"
    rev = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / "snapshots" / rev / filename)


@pytest.mark.parametrize("cached", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_pretrained_tag_found_in_the_hub_cache_offline(tiny, tmp_path, monkeypatch, cached):
    """The usual path on a user's machine: a tag whose weights sit in the Hugging Face cache."""
    import open_clip

    config, pt, st, model = tiny
    real = open_clip.get_pretrained_cfg

    def fake_cfg(name, tag):
        if name == TINY_NAME and tag == "fake-tag":
            return {"hf_hub": "zmagic-test/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
        return real(name, tag)

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", fake_cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "zmagic-test/tiny-clip", cached, pt if cached.endswith(".bin") else st)
    energy = build_clip_text(BuildContext(), prompt="a red circle", model_config=str(config),
                             pretrained="fake-tag", cache_dir=str(tmp_path))
    assert torch.allclose(energy.preprocess.shift, torch.full((1, 3, 1, 1), 0.0))  # the tag's mean
    assert torch.allclose(energy.preprocess.scale, torch.full((1, 3, 1, 1), 0.5))  # and std
    sd = model.visual.state_dict()
    for k, v in energy.visual.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_pretrained_file_is_checked_resolved_and_identified(tiny, tmp_path, monkeypatch):
    """pretrained may name a local file: check reports a missing one, a relative one resolves against the
    recipe's folder, its contents are part of a run folder's identity; a tag stays a name."""
    import shutil

    import yaml
    from zmagic_core import check_recipe, load_recipe
    from zmagic_core.app.identity import folder_identity
    from zmagic_core.testing import assert_path_option_contract

    config, pt, st, _ = tiny
    (tmp_path / "w").mkdir()
    shutil.copy(config, tmp_path / "w" / config.name)
    shutil.copy(st, tmp_path / "w" / "clip.safetensors")
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"kind": "shapes", "size": 32}, "solver": {"kind": "ddpm", "steps": 2},
        "conditions": [{"kind": "clip-text", "prompt": "a red circle", "model_config": f"w/{config.name}",
                        "pretrained": "w/clip.safetensors"}],
        "num_samples": 1, "batch_size": 1, "device": "cpu"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recipe must not depend on the working directory
    assert_path_option_contract(recipe, "pretrained", tmp_path / "w" / "clip.safetensors", pt)
    tag = check_recipe(load_recipe(recipe, ["conditions.0.pretrained=openai", "conditions.0.model_config=null"]))
    assert tag.parts["conditions.0"][1]["pretrained"] == "openai"
    assert "conditions.0.options.pretrained" not in folder_identity(tag)["files"]


def test_options_that_fail_only_at_build_are_reported_by_check(tiny):
    from zmagic_core.assembly.build import find_problems

    def problem(**options):
        found = find_problems({"model": {"kind": "shapes", "size": 32}, "device": "cpu",
                               "conditions": [{"kind": "clip-text", "prompt": "x", **options}]})
        assert len(found) == 1, found
        return found[0]

    assert "model: 'ViT-B-16' does not match model_config" in problem(model_config=str(tiny[0]), model="ViT-B-16")
    assert "pretrained: null needs checkpoint" in problem(pretrained=None)
    with pytest.raises(ConfigError, match="^clip-text options: Value error, pretrained: null needs checkpoint"):
        build_clip_text(BuildContext(), prompt="x", pretrained=None)
