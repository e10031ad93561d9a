"""FID's maths with an injected feature network (offline), its message when the Inception weights
are missing, and `zmagic manifest` on tiny folders with the public datasets' layouts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zmagic_core.app.experiment_command import main
from zmagic_core.contracts.errors import WeightsNotFoundError

pytest.importorskip("torchmetrics", reason="the eval extra is not installed (pip install 'zmagic-core[eval]')")


class ColourStats(torch.nn.Module):
    """A tiny feature network: per-channel mean and standard deviation of uint8 images (6 features)."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _images(folder: Path, n: int, seed: int, brightness: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = rng.uniform(0, 1, 3) * brightness
        img = np.clip(base + rng.normal(0, rng.uniform(0.05, 0.3), (16, 16, 3)), 0, 1)
        paths.append(folder / f"{i}.png")
        Image.fromarray((img * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_frechet_formula_with_an_injected_feature_network(tmp_path):
    from zmagic_core.app.evaluation_fid import fid, fid_many

    real = _images(tmp_path / "real", 40, 0, 1.0)
    fake = _images(tmp_path / "fake", 30, 1, 0.6)
    net = ColourStats()

    def feats(paths):
        return net(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                                for p in paths])).double().numpy()

    expected = _frechet(feats(real), feats(fake))
    assert fid(fake, real, net, batch_size=7) == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert fid(real, real, net) == pytest.approx(0.0, abs=1e-4)
    many = fid_many({"a": fake, "b": real}, real, net, batch_size=8)  # the reference's features computed once
    assert many["a"] == pytest.approx(expected, rel=1e-3, abs=1e-5) and many["b"] == pytest.approx(0.0, abs=1e-4)


def test_fid_without_inception_weights_names_the_file_and_where(tmp_path, monkeypatch):
    from zmagic_core.app.evaluation_fid import INCEPTION_FILE, fid_for_variants, inception
    from zmagic_core.app.experiment import FidSpec

    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError) as err:
        inception()
    assert INCEPTION_FILE in str(err.value) and str(tmp_path / "weights") in str(err.value)
    assert "torch-fidelity" in str(err.value)
    _images(tmp_path / "ref", 3, 0, 1.0)
    out, note = fid_for_variants({"v": []}, FidSpec(reference=str(tmp_path / "ref")), tmp_path)
    assert out == {} and note.startswith("not computed: FID Inception-v3 weights") and INCEPTION_FILE in note


# -- manifests ------------------------------------------------------------------------------------------
@pytest.fixture
def datasets(tmp_path):
    """Tiny folders laid out as CelebAMask-HQ (CelebA-HQ-img, CelebAMask-HQ-mask-anno) and
    Multi-Modal-CelebA-HQ (celeba-caption)."""
    root = tmp_path / "data"
    images, anno, captions = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno", root / "celeba-caption"
    for folder in (images, captions):
        folder.mkdir(parents=True)
    for n in range(8):
        Image.new("RGB", (8, 8), (n * 30, 0, 0)).save(images / f"{n}.jpg")
        if n != 7:
            (captions / f"{n}.txt").write_text(f"person {n} smiles.\nperson {n} has hair.\n")
        if n not in (0, 3):
            (anno / str(n // 2000)).mkdir(parents=True, exist_ok=True)
            for part in ("skin", "hair", "l_eye"):
                Image.new("L", (8, 8)).save(anno / str(n // 2000) / f"{n:05d}_{part}.png")
    styles = root / "styles"
    styles.mkdir()
    for name in ("wave", "starry", "scream"):
        Image.new("RGB", (8, 8)).save(styles / f"{name}.png")
    (root / "prompts.txt").write_text("a cat wearing glasses\n\na lighthouse at dusk\n")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manifest_table1_samples_rows_with_annotated_captioned_layouts_and_another_identity(datasets, tmp_path, capsys):
    out = tmp_path / "manifests" / "table1.jsonl"
    sources = ["manifest", "table1", "--images", str(datasets / "CelebA-HQ-img"), "--annotations",
               str(datasets / "CelebAMask-HQ-mask-anno"), "--captions", str(datasets / "celeba-caption")]
    args = sources + ["--rows", "4", "--seed", "1", "--out", str(out)]
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    for r in rows:
        layout = (out.parent / r["conditions.1.reference"]).resolve()
        identity = (out.parent / r["conditions.2.reference"]).resolve()
        assert layout.is_file() and identity.is_file() and layout != identity
        n = int(layout.stem)
        assert n not in (0, 3, 7)  # annotated and captioned only
        assert r["conditions.0.prompt"] in (f"person {n} smiles.", f"person {n} has hair.")
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first        # the same seed, the same rows
    assert main(sources + ["--rows", "4", "--seed", "2", "--out", str(out)]) == 0 and out.read_text() != first
    capsys.readouterr()
    assert main(sources + ["--rows", "9", "--seed", "1", "--out", str(out)]) == 2
    assert "only 5 annotated, captioned images available, 9 rows asked" in capsys.readouterr().err


def test_manifest_tables_2_3_4_and_missing_inputs(datasets, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["manifest", "table2", "--styles", str(datasets / "styles"), "--prompts",
                 str(datasets / "prompts.txt"), "--rows", "6", "--out", str(out / "t2.jsonl")]) == 0
    rows = _rows(out / "t2.jsonl")
    assert len({(r["model.prompt"], r["conditions.0.reference"]) for r in rows}) == 6  # every pair once
    assert main(["manifest", "table3", "--images", str(datasets / "CelebA-HQ-img"), "--annotations",
                 str(datasets / "CelebAMask-HQ-mask-anno"), "--captions", str(datasets / "celeba-caption"),
                 "--rows", "3", "--out", str(out / "t3.jsonl")]) == 0
    assert all(set(r) == {"id", "conditions.0.prompt", "conditions.1.reference"} for r in _rows(out / "t3.jsonl"))
    assert main(["manifest", "table4", "--images", str(datasets / "CelebA-HQ-img"), "--rows", "8",
                 "--out", str(out / "t4.jsonl")]) == 0
    rows = _rows(out / "t4.jsonl")
    assert all(r["conditions.0.reference"] != r["conditions.1.reference"] for r in rows) and len(rows) == 8
    capsys.readouterr()
    assert main(["manifest", "table1", "--images", str(datasets / "CelebA-HQ-img"), "--out", str(out / "x.jsonl")]) == 2
    assert "manifest table1 needs --annotations, --captions" in capsys.readouterr().err
    assert main(["manifest", "table4", "--images", str(tmp_path / "nope"), "--out", str(out / "x.jsonl")]) == 2
    assert "CelebA-HQ image folder not found" in capsys.readouterr().err
