"""Options that cannot work are refused by the options model (so ``zmagic check`` reports them before the
base model loads); points files that cannot give a target or a box, and a missing FAN offline, fail at
once with one line."""
import json

import pytest

from zmagic_core import BuildContext, ConfigError, InputError, WeightsNotFoundError, load_recipe
from zmagic_landmark.energy import build_landmark

CTX = BuildContext()
FIVE = [[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]]


def check(**options) -> None:
    """``zmagic check`` of a one-condition recipe: nothing is built."""
    load_recipe({"model": {"kind": "shapes", "size": 32}, "solver": {"kind": "ddpm", "steps": 2},
                 "conditions": [{"kind": "landmark", **options}]})


@pytest.fixture
def five_json(tmp_path):
    path = tmp_path / "five.json"
    path.write_text(json.dumps(FIVE))
    return path


@pytest.mark.parametrize("box", [[181, 62, 268, 172], [0.9, 0.1, 0.1, 0.9], [0.2, 0.2, 0.2, 0.8], [0.1, 0.2, 0.3]])
def test_box_not_in_fractions_or_empty_is_refused_by_check(box, astronaut_png):
    with pytest.raises(ConfigError, match=r"options\.box: .*4 fractions .* in \[0, 1\].*x0 < x1 and y0 < y1"):
        check(reference=str(astronaut_png), box=box)
    with pytest.raises(ConfigError, match=r"box: .*4 fractions") as err:
        build_landmark(CTX, reference=str(astronaut_png), box=box)
    assert "\n" not in str(err.value)


def test_target_and_points_size_are_checked_by_check(astronaut_png, five_json):
    with pytest.raises(ConfigError, match="exactly one of 'reference'.*or 'points'"):
        check(reference=str(astronaut_png), points=str(five_json))
    with pytest.raises(ConfigError, match="exactly one of 'reference'.*or 'points'"):
        check(backbone="onet")
    with pytest.raises(ConfigError, match=r"options\.points_size: .*both > 0"):
        check(points=str(five_json), points_size=[0, 0])


def test_points_that_are_all_equal_give_no_box(tmp_path):
    same = tmp_path / "same.json"
    same.write_text(json.dumps([[0.5, 0.5]] * 5))
    with pytest.raises(InputError, match=r"points file .*same\.json: the points span no area"):
        build_landmark(CTX, points=str(same))
    build_landmark(CTX, points=str(same), box=[0.3, 0.3, 0.7, 0.7])  # with a box they are a valid target


@pytest.mark.parametrize("width", [None, [256], "abc", 0, True])
def test_bad_width_in_a_points_file_names_the_file_and_the_field(width, tmp_path):
    path = tmp_path / "pixels.json"
    path.write_text(json.dumps({"points": [[p[0] * 256, p[1] * 256] for p in FIVE], "width": width, "height": 256}))
    with pytest.raises(InputError, match=r"points file .*pixels\.json: 'width' must be a positive number") as err:
        build_landmark(CTX, points=str(path))
    assert "\n" not in str(err.value)


def test_offline_fan_fails_at_once_naming_the_file_and_the_cache(tmp_path, monkeypatch, astronaut_png):
    import face_alignment.utils
    import zmagic_core.files.weights as weights  # the download guard is the core's

    tried = []
    monkeypatch.setattr(face_alignment.utils, "load_file_from_url", lambda *a, **k: tried.append(a))
    monkeypatch.setenv("ZMAGIC_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "2DFAN4-11f355bf06.pth.tar"
    with pytest.raises(WeightsNotFoundError, match="offline mode is on") as err:
        build_landmark(CTX, reference=str(astronaut_png), backbone="fan", fan_modules=1)
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    # online, but the host does not answer: one short probe, no download
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "unreachable", lambda url: "www.adrianbulat.com cannot be reached (timed out)")
    with pytest.raises(WeightsNotFoundError, match="adrianbulat.com cannot be reached") as err:
        build_landmark(CTX, reference=str(astronaut_png), backbone="fan", fan_modules=1)
    assert str(cache) in str(err.value)
    assert tried == []
