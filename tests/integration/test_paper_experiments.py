"""The paper's four experiment files, with manifests built by `zmagic manifest` from tiny folders laid
out as the public datasets: every (variant, row) recipe checks against the installed plugins, and
without the real weights the pre-flight lists every missing one together and writes nothing."""
from pathlib import Path

import pytest
from PIL import Image

from zmagic_core.app.experiment import read_experiment
from zmagic_core.app.experiment_command import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "examples" / "experiments"


@pytest.fixture
def data(tmp_path):
    img, anno, cap, styles = (tmp_path / d for d in ("CelebA-HQ-img", "CelebAMask-HQ-mask-anno/0", "celeba-caption",
                                                      "styles"))
    for folder in (img, anno, cap, styles):
        folder.mkdir(parents=True)
    for n in range(4):
        Image.new("RGB", (32, 32), (60 * n, 80, 80)).save(img / f"{n}.jpg")
        Image.new("L", (32, 32)).save(anno / f"{n:05d}_skin.png")
        (cap / f"{n}.txt").write_text("she has blond hair.\nshe is smiling.\n")
        Image.new("RGB", (32, 32)).save(styles / f"style{n}.png")
    (tmp_path / "prompts.txt").write_text("a cat wearing glasses\n")
    return tmp_path


SOURCES = {
    "table1": ["--images", "CelebA-HQ-img", "--annotations", "CelebAMask-HQ-mask-anno", "--captions", "celeba-caption"],
    "table2": ["--styles", "styles", "--prompts", "prompts.txt"],
    "table3": ["--images", "CelebA-HQ-img", "--annotations", "CelebAMask-HQ-mask-anno", "--captions", "celeba-caption"],
    "table4": ["--images", "CelebA-HQ-img"],
}
MISSING = {
    "table1": ["model (diffusers-pixel)", "conditions.0 (clip-text)", "conditions.1 (parsing)", "conditions.2 (faceid)"],
    "table2": ["model (stable-diffusion)", "conditions.0 (style)"],
    "table3": ["model (diffusers-pixel)", "conditions.0 (clip-text)", "conditions.1 (parsing)"],
    "table4": ["model (diffusers-pixel)", "conditions.0 (faceid)", "conditions.1 (landmark)"],
}
EXTRA = {"table4": ["recipe.conditions.1.download=false"]}  # never fetch FAN's 90 MB in a test


@pytest.mark.parametrize("table", sorted(SOURCES))
def test_paper_experiment_preflight_lists_every_missing_weight_and_writes_nothing(table, data, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(data / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(data / "torch"))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(data / "weights"))
    monkeypatch.setenv("HOME", str(data / "home"))
    args = [a if a.startswith("--") else str(data / a) for a in SOURCES[table]]
    manifest = data / f"{table}.jsonl"
    assert main(["manifest", table, *args, "--rows", "2", "--out", str(manifest)]) == 0
    overrides = [f"manifest={manifest}", "device=cpu"] + EXTRA.get(table, [])
    exp = read_experiment(EXPERIMENTS / f"{table}.yaml", overrides)
    assert len(exp.rows) == 2 and len(exp.variants) >= 2
    out = data / "out"
    capsys.readouterr()
    assert main(["experiment", str(EXPERIMENTS / f"{table}.yaml"), "--out", str(out)]
                + [x for o in overrides for x in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert "pre-flight found" in err and "nothing was generated" in err
    for part in MISSING[table]:
        assert f"  - {part}: " in err, (part, err)
    assert not out.exists()
