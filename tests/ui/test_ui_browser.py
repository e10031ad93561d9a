"""The web app end to end in a real browser (headless Chromium through selenium).

Starts `zmagic ui`'s app on a free localhost port, adds two shapes-world conditions through the
form, checks that a bad value is reported next to its field, runs (size 16, 20 steps, 4 samples),
and checks that the samples, both plots and the final-energy table appear.  A screenshot of the
finished page is written to $ZMAGIC_UI_SCREENSHOT (default outputs/ui/screenshot.png).

Skipped only when Chromium or chromedriver is not installed (`.ci/run` installs them).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml

CHROMEDRIVER = os.environ.get("ZMAGIC_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = next((p for p in (os.environ.get("ZMAGIC_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
if not (Path(CHROMEDRIVER).is_file() and CHROMIUM):
    pytest.skip(f"needs Chromium and chromedriver ({CHROMEDRIVER}); install them with "
                "`apt-get install -y chromium chromium-driver`", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the skip: the ui extra installs selenium)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from zmagic_core.app.ui import ZmagicApp  # noqa: E402
from zmagic_core.files.images import save_image  # noqa: E402
from zmagic_core.models.shapes.world import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("ZMAGIC_UI_SCREENSHOT", ROOT / "outputs" / "ui" / "screenshot.png"))
START = {"model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 20},
         "combiner": {"kind": "dependent"}, "conditions": [], "num_samples": 4, "batch_size": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = ZmagicApp(out_root=tmp_path_factory.mktemp("ui-out"), initial=START)
    port = _free_port()
    app.launch(host="127.0.0.1", port=port, block=False, quiet=True)
    app.url = f"http://127.0.0.1:{port}"
    yield app
    app.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1800"):
        options.add_argument(arg)
    profile = tempfile.mkdtemp(prefix="zmagic-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# -- driving Gradio's widgets ---------------------------------------------------------------------
def _wait(driver, condition, timeout=30, message=""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out: {message}; status: {_text(driver, 'status')!r}; "
                             f"errors: {_text(driver, 'error-general')!r}") from None


def _text(driver, elem_id) -> str:
    found = driver.find_elements(By.ID, elem_id)
    return found[0].text if found else ""


def _field(driver, elem_id):
    """The input element of a Gradio textbox, number or dropdown."""
    return _wait(driver, lambda d: next((e for e in d.find_elements(
        By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea") if e.is_displayed()), None),
        message=f"a visible input in #{elem_id}")


def _type(driver, elem_id, text):
    box = _field(driver, elem_id)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(text))
    box.send_keys(Keys.TAB)


def _choose(driver, elem_id, option):
    """Pick ``option`` in a Gradio dropdown: type to filter its list, click the entry."""
    box = _field(driver, elem_id)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(option)
    item = _wait(driver, lambda d: next((li for li in d.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li[role=option]")
                                         if li.is_displayed() and li.get_attribute("aria-label") == option), None),
                 message=f"option {option!r} of #{elem_id}")
    item.click()
    _wait(driver, lambda d: _field(d, elem_id).get_attribute("value") == option, message=f"#{elem_id} = {option}")


def _click(driver, elem_id):
    button = _wait(driver, lambda d: next((b for b in d.find_elements(By.ID, elem_id) if b.is_displayed()), None),
                   message=f"button #{elem_id}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()


def _pool_id(app, slot, kind, key):
    f = app.layout.field("condition", kind, key)
    return f"cond{slot}-{f.pool}{f.index}"


def _images(driver, elem_id):
    return [img for img in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
            if img.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", img) > 0]


def _full_page_screenshot(driver, path: Path) -> None:
    """The whole page, beyond the window (Chrome DevTools' captureBeyondViewport)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


# -- the test ---------------------------------------------------------------------------------------
def test_two_conditions_bad_value_then_run(app, browser):
    started = time.perf_counter()
    d = browser
    d.get(app.url)
    _wait(d, lambda d: d.find_elements(By.ID, "add-condition"), message="the page")
    assert not [e for e in d.find_elements(By.ID, "cond0") if e.is_displayed()]  # START has no conditions

    # two conditions: the colour red (typed first as "purple") and the mask of a red circle
    for slot in (0, 1):
        _click(d, "add-condition")
        _wait(d, lambda d: any(e.is_displayed() for e in d.find_elements(By.ID, f"cond{slot}")),
              message=f"condition slot {slot} shown")
    _choose(d, "cond0-kind", "shapes-attribute")
    _choose(d, _pool_id(app, 0, "shapes-attribute", "attribute"), "color")
    _type(d, _pool_id(app, 0, "shapes-attribute", "value"), "purple")
    _type(d, "cond0-scale", "0.25")
    _choose(d, "cond1-kind", "shapes-mask")
    _type(d, _pool_id(app, 1, "shapes-mask", "reference"), "red circle center")
    _type(d, "cond1-scale", "0.25")

    # a bad value: its message appears in condition 1's block, not in the page as a traceback
    _click(d, "run")
    error = _wait(d, lambda d: "purple" in _text(d, "error-cond0") and _text(d, "error-cond0"),
                  message="the error next to condition 1")
    assert "conditions.0" in error and "expected one of" in error
    assert not _text(d, "error-cond1") and "Traceback" not in d.page_source

    # fixed: the run shows the samples, both plots and the final energies
    _type(d, _pool_id(app, 0, "shapes-attribute", "value"), "red")
    _click(d, "run")
    _wait(d, lambda d: _text(d, "status").startswith("Done"), timeout=40, message="the run to finish")
    _wait(d, lambda d: len(_images(d, "gallery")) >= 4, message="4 samples in the gallery")
    _wait(d, lambda d: _images(d, "energy-plot") and _images(d, "cosine-plot"), message="both plots")
    assert not _text(d, "error-cond0")
    status = _text(d, "status")
    assert "4 of 4 samples" in status and "joint satisfaction" in status
    table = _text(d, "final-energy")
    assert "mean" in table and "shapes-attribute" in table and "shapes-mask" in table

    # the run folder is a normal one
    folders = [p for p in Path(app.out_root).glob("*/*") if (p / "record.json").exists()]
    assert len(folders) == 1
    assert {"grid.png", "energy.png", "cosine.png", "recipe.json"} <= {p.name for p in folders[0].iterdir()}
    assert len(list(folders[0].glob("sample_*.png"))) == 4

    _full_page_screenshot(d, SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000
    assert time.perf_counter() - started < 60


def test_load_recipe_then_compare_combiners(app, browser, tmp_path):
    d = browser
    d.get(app.url)
    _wait(d, lambda d: d.find_elements(By.ID, "add-condition"), message="the page")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "model: {kind: shapes, size: 16}\n"
        "solver: {kind: ddpm, steps: 20}\n"
        "combiner: {kind: zmagic}\n"  # an alias: shown as `dependent`
        "conditions:\n"
        "  - {kind: shapes-attribute, attribute: shape, value: circle, scale: 0.25}\n"
        "  - {kind: shapes-mask, reference: red circle center, scale: 0.25, stop: 100}\n"
        "num_samples: 4\nbatch_size: 4\n")
    upload = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#recipe-upload input[type=file]"),
                   message="the recipe upload")
    upload[0].send_keys(str(recipe))
    _wait(d, lambda d: "Loaded two.yaml" in _text(d, "load-status"), message="the recipe to load")
    _wait(d, lambda d: any(e.is_displayed() for e in d.find_elements(By.ID, "cond1")), message="two conditions shown")
    assert _field(d, "cond1-kind").get_attribute("value") == "shapes-mask"
    assert _field(d, "combiner-kind").get_attribute("value") == "dependent"
    assert _field(d, _pool_id(app, 0, "shapes-attribute", "value")).get_attribute("value") == "circle"
    assert _field(d, "cond1-stop").get_attribute("value") == "100"

    # an image as condition 2's reference: the upload is copied into this session's upload folder
    image = tmp_path / "red circle.png"
    save_image(render("circle", "red", "center", 16), image)
    reference = _pool_id(app, 1, "shapes-mask", "reference")
    d.find_element(By.CSS_SELECTOR, "#cond1-image0 input[type=file]").send_keys(str(image))
    _wait(d, lambda d: _field(d, reference).get_attribute("value").startswith(str(app.upload_root)),
          message="the uploaded reference's path in its text box")
    copied = Path(_field(d, reference).get_attribute("value"))
    assert copied.is_file() and copied.name.endswith("red_circle.png") and copied.read_bytes() == image.read_bytes()

    # the form saved as a recipe: the same run as the file loaded, with the uploaded reference
    _click(d, "save-recipe")
    _wait(d, lambda d: _text(d, "load-status").startswith("Saved recipe.yaml"), message="the saved recipe")
    saved = yaml.safe_load(next(Path(app.out_root).glob("*/recipe.yaml")).read_text())
    assert saved == {"model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 20},
                     "combiner": {"kind": "dependent"}, "batch_size": 4, "conditions": [  # num_samples 4: the default
                         {"kind": "shapes-attribute", "scale": 0.25, "attribute": "shape", "value": "circle"},
                         {"kind": "shapes-mask", "scale": 0.25, "stop": 100, "reference": str(copied)}]}

    _click(d, "compare")
    _wait(d, lambda d: _text(d, "status").startswith("Compared"), timeout=40, message="the comparison to finish")
    for name in ("sum", "dependent", "cagrad"):
        _wait(d, lambda d: len(_images(d, f"compare-{name}")) >= 4, message=f"4 samples under {name}")
    table = _text(d, "compare-table")
    assert all(name in table for name in ("sum", "dependent", "cagrad"))
    records = sorted(Path(app.out_root).glob("*/*-compare-*/*/record.json"))
    assert [p.parent.name for p in records] == ["cagrad", "dependent", "sum"]
    recipe = json.loads(records[0].read_text())["recipe"]
    assert recipe["conditions"][1]["options"]["reference"] == str(copied)  # the uploaded image was the reference
