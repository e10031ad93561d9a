"""Options that cannot work are refused by the options model (so ``zmagic check`` reports them before the
base model loads), a missing facenet checkpoint fails at once offline, and the no-face message suggests
what the given options allow."""
import math

import pytest

from zmagic_core import BuildContext, ConfigError, InputError, WeightsNotFoundError, load_recipe
from zmagic_faceid.energy import build_faceid

CTX = BuildContext()


def check(reference, **options) -> None:
    """``zmagic check`` of a one-condition recipe: nothing is built."""
    load_recipe({"model": {"kind": "shapes", "size": 32}, "solver": {"kind": "ddpm", "steps": 2},
                 "conditions": [{"kind": "faceid", "reference": str(reference), **options}]})


@pytest.mark.parametrize("box", [[181, 62, 268, 172], [0.9, 0.1, 0.1, 0.9], [0.2, 0.2, 0.2, 0.8],
                                 [-0.1, 0.1, 0.5, 0.5], [0.1, 0.2, 0.3]])
def test_box_not_in_fractions_or_empty_is_refused_by_check(box, astronaut_png, tiny_options):
    with pytest.raises(ConfigError, match=r"options\.box: .*4 fractions .* in \[0, 1\].*x0 < x1 and y0 < y1") as err:
        check(astronaut_png, box=box)
    assert "\n" not in str(err.value.problems[0])
    with pytest.raises(ConfigError, match=r"box: .*4 fractions") as err:
        build_faceid(CTX, **tiny_options, box=box)
    assert "\n" not in str(err.value)


def test_nan_in_the_box_is_refused(tiny_options):
    with pytest.raises(ConfigError, match=r"box: .*4 fractions"):
        build_faceid(CTX, **tiny_options, box=[0.1, 0.1, math.nan, 0.9])  # the recipe reader refuses NaN itself


@pytest.mark.parametrize("options, message", [
    ({"crop": "freedom", "box": [0.1, 0.2, 0.3, 0.4]}, "'box' needs crop: mtcnn"),
    ({"units": [1, 1, 1], "widths": [16, 16, 32, 32]}, "'units' and 'widths' need the same length"),
])
def test_options_that_do_not_go_together_are_refused_by_check(options, message, astronaut_png):
    with pytest.raises(ConfigError, match=message):
        check(astronaut_png, **options)


def test_offline_facenet_fails_at_once_naming_the_file_and_the_cache(tmp_path, monkeypatch, astronaut_png):
    import facenet_pytorch.models.utils.download as download
    import zmagic_core.files.weights as weights  # the download guard is the core's

    tried = []
    monkeypatch.setattr(download, "download_url_to_file", lambda *a, **k: tried.append(a))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "20180402-114759-vggface2.pt"
    with pytest.raises(WeightsNotFoundError, match="offline mode is on") as err:
        build_faceid(CTX, reference=str(astronaut_png), backbone="facenet")
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    # online, but the host does not answer: one short probe, no download
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "unreachable", lambda url: "github.com cannot be reached (timed out)")
    with pytest.raises(WeightsNotFoundError, match="github.com cannot be reached") as err:
        build_faceid(CTX, reference=str(astronaut_png), backbone="facenet")
    assert str(cache) in str(err.value)
    assert tried == []


@pytest.mark.parametrize("options, remedy, not_said", [
    ({}, "set an explicit 'box' and check_face: false", None),
    ({"box": [0.2, 0.2, 0.8, 0.8]}, "set check_face: false", "explicit 'box'"),
    ({"crop": "freedom"}, "set check_face: false", "explicit 'box'"),
    ({"check_face": False}, "set an explicit 'box'$", "check_face"),
])
def test_no_face_message_suggests_what_the_options_allow(options, remedy, not_said, tiny_options, grey_png):
    with pytest.raises(InputError, match=rf"no face found.*grey\.png.*{remedy}") as err:
        build_faceid(CTX, **{**tiny_options, "reference": str(grey_png), **options})
    assert not_said is None or not_said not in str(err.value)
