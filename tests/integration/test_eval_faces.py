"""The independent face evaluators (plugin zmagic-metrics) on real photos with dlib's real weights:
the same person (mirrored, re-lit) is closer than dlib's 0.6, two people are farther; landmarks
follow a shifted face by exactly the shift; the evaluators' output is what `zmagic eval` reads;
evaluators without their weights say so."""
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from zmagic_core.contracts.components import FinishedRun

dlib = pytest.importorskip("dlib", reason="dlib is not installed (pip install dlib-bin face-recognition-models)")
metrics = pytest.importorskip("zmagic_metrics")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def faces():
    return metrics.DlibFaces.shared()


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()


@pytest.fixture(scope="module")
def hopper():
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.array(Image.open(path).convert("RGB"))


def test_id_distance_same_person_below_and_two_people_above_the_threshold(faces, astronaut, hopper):
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    darker = (astronaut * 0.5).astype(np.uint8)
    assert metrics.id_distance(faces, astronaut, mirrored) < 0.6
    assert metrics.id_distance(faces, astronaut, darker) < 0.6
    assert metrics.id_distance(faces, astronaut, hopper) > 0.6
    assert metrics.id_distance(faces, astronaut, astronaut) == 0.0


def test_landmarks_of_a_shifted_photo_move_by_the_shift(faces, astronaut):
    dx, dy = 30, 20
    shifted = np.zeros_like(astronaut)
    shifted[dy:, dx:] = astronaut[:-dy, :-dx]
    a, b = faces.landmarks(astronaut), faces.landmarks(shifted)
    assert a.shape == (68, 2)
    assert np.abs((b - a) - [dx, dy]).max() <= 1.0  # dlib's points are whole pixels
    assert metrics.landmark_distance(a, a, 512, 512) == 0.0
    assert abs(metrics.landmark_distance(a + [dx, 0], a, 512, 512) - dx / 512) < 1e-12


def _run(recipe: dict, images: list[np.ndarray]) -> FinishedRun:
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    return FinishedRun(recipe, None, [], x, x, list(range(len(images))))


def test_face_evaluators_report_metrics_in_the_form_eval_reads(tmp_path, astronaut, hopper):
    from zmagic_core.app.evaluation import RowResult, generic_metrics

    Image.fromarray(astronaut).save(tmp_path / "id.png")
    recipe = {"conditions": [{"kind": "faceid", "name": "id", "options": {"reference": str(tmp_path / "id.png")}},
                             {"kind": "landmark", "name": "pose", "options": {"reference": str(tmp_path / "id.png")}}]}
    run = _run(recipe, [np.ascontiguousarray(astronaut[:, ::-1]), hopper[:512]])
    ident = metrics.DlibIdEvaluator()
    assert ident.applies_to(recipe) and not ident.applies_to({"conditions": [{"kind": "clip-text"}]})
    result = ident.evaluate(run)
    distances = result["metrics"]["id_distance_dlib:id"]["per_sample"]
    assert distances[0] < 0.6 < distances[1]
    assert result["metrics"]["face_found_dlib:id"]["per_sample"] == [True, True]
    landmarks = metrics.DlibLandmarkEvaluator().evaluate(run)["metrics"]["landmark_distance_dlib:pose"]
    assert landmarks["independent"] and len(landmarks["per_sample"]) == 2
    row = RowResult()
    generic_metrics("face-id-dlib", result, row)
    assert row.values["id_distance_dlib:id"] == pytest.approx(np.mean(distances))
    assert row.metrics["id_distance_dlib:id"].better == "lower"


def test_without_dlib_the_evaluator_says_so(monkeypatch, astronaut, tmp_path):
    def missing():
        raise metrics.DlibMissing("dlib is not installed (pip install dlib-bin face-recognition-models)")

    monkeypatch.setattr(metrics.DlibFaces, "shared", staticmethod(missing))
    recipe = {"conditions": [{"kind": "faceid", "options": {"reference": "x.png"}}]}
    note = metrics.DlibIdEvaluator().evaluate(_run(recipe, [astronaut]))["note"]
    assert note.startswith("skipped: dlib is not installed") and "dlib-bin" in note


def test_evaluators_without_weights_name_what_is_missing(monkeypatch, tmp_path, astronaut):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("ZMAGIC_PARSING_WEIGHTS", raising=False)
    Image.fromarray(astronaut).save(tmp_path / "ref.png")
    ref = str(tmp_path / "ref.png")
    recipe = {"conditions": [{"kind": "clip-text", "name": "text", "options": {"prompt": "a face"}},
                             {"kind": "parsing", "name": "seg", "options": {"reference": ref}},
                             {"kind": "style", "name": "style", "options": {"reference": ref}}]}
    run = _run(recipe, [astronaut])
    clip = metrics.ClipLargeTextEvaluator().evaluate(run)
    assert clip["note"].startswith("skipped: CLIP ViT-L/14 weights are not on this machine")
    seg = metrics.SegmentationEvaluator().evaluate(run)
    assert "SegFormer skipped: weights not on this machine" in seg["note"] and "79999_iter.pth" in seg["note"]
    style = metrics.VggStyleEvaluator().evaluate(run)
    assert style["note"].startswith("skipped: VGG19 weights are not on this machine") and "vgg19" in style["note"]


def test_every_metrics_evaluator_builds_through_the_plugin_registry():
    """As `zmagic eval` and experiments build them: through the installed entry point's factories."""
    import torch

    from zmagic_core import BuildContext
    from zmagic_core.plugins.registry import Registry
    from zmagic_metrics.evaluators import EVALUATORS

    registry = Registry()
    for name, cls in EVALUATORS.items():
        evaluator = registry.get("evaluator", name).factory(BuildContext(device=torch.device("cpu")))
        assert isinstance(evaluator, cls), name
