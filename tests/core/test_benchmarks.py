"""The benchmarks run on a tiny setting and their figures come from real runs."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from zmagic_core import Combined, Combiner, hookimpl
from zmagic_core.app import cli
from zmagic_core.app.bench import cost, quality, report
from zmagic_core.app.bench.report import write_section
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.method.combiners import SumCombiner
from zmagic_core.method.guidance import Condition
from zmagic_core.plugins.registry import get_registry
from zmagic_core.sampling.pipeline import Pipeline
from zmagic_core.models.shapes import ShapesModel, evaluate_samples
from zmagic_core.method.solvers import DDPMSolver

TINY = ["--samples", "4", "--seeds-sets", "1", "--steps", "5", "--scale", "0.25", "--scenarios", "attr+mask"]


@pytest.fixture(scope="module")
def world():
    return ShapesModel(32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- a third-party combiner, registered in-process --------------------------------------------------
class HalfSum(Combiner):
    """Half the sum of the conditions' gradients (a stand-in for a plugin's combiner)."""

    calls = 0

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def combine(self, step):
        type(self).calls += 1
        return Combined(self.factor * torch.stack([g.detach() for g in step.base().grads]).sum(0))


class HalfSumOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = 0.5


class HalfSumPlugin:
    @hookimpl
    def register_combiners(self, register):
        register("test-half-sum", lambda context, **options: HalfSum(**options), options=HalfSumOptions,
                 component=HalfSum)


@pytest.fixture
def half_sum():
    registry = get_registry()
    registry.register_plugin(HalfSumPlugin(), "test-bench-plugin")
    HalfSum.calls = 0
    yield "test-half-sum"
    registry.unregister_plugin("test-bench-plugin")


def linked_figures(page: str, out: Path) -> list[str]:
    """Every figure the page links to exists beside it (in out/benchmarks/)."""
    links = re.findall(r"\]\((benchmarks/[^)]+)\)", page)
    for link in links:
        assert (out / link).stat().st_size > 1000, link
    return links


# -- quality -----------------------------------------------------------------------------------------
def test_quality_main_writes_page_figures_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    argv = ["--samples", "4", "--seeds-sets", "2", "--steps", "5", "--scale", "0.25", "--scenarios", "attr+mask",
            "--methods", "none", "sum", "dep 1>2", "oracle", "--out", str(out)]
    assert quality.main(argv) == 0
    page = (out / "benchmarks.md").read_text()
    assert "<!-- quality:begin -->" in page and "Command: `zmagic bench quality --samples 4" in page
    assert f"Code: zmagic-core {report.version()}" in page and "git" not in page.split("Setting:")[0]
    for method in ("| none |", "| sum |", "| dep 1>2 |", "| oracle |"):
        assert method in page
    data = out / "benchmarks"
    for name in ("joint_satisfaction.png", "cosine_conditions.png", "cosine_exact.png", "energies_attr_mask.png"):
        assert (data / name).stat().st_size > 1000
    assert len(linked_figures(page, out)) == 4
    results = json.loads((data / "quality.json").read_text())
    runs = results["results"]["attr+mask"]["sum"]
    assert len(runs) == 2 and runs[0]["seeds"] == [0, 1] and runs[1]["seeds"] == [1000, 1001]
    assert len(runs[0]["energy_step"]["red"]) == 5
    assert results["meta"]["version"] == report.version() and results["meta"]["machine"]
    assert not (tmp_path / "benchmarks.md").exists()  # nothing outside --out


def test_quality_benchmarks_a_third_party_combiner_by_name_from_the_cli(tmp_path, monkeypatch, half_sum):
    """`zmagic bench quality --combiners sum,<plugin's combiner>` from any working directory: the
    page, the JSON and the figures land in --out (relative to that directory)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "report").mkdir()
    write_section(cwd / "report" / "benchmarks.md", "cost", "the cost section stays")
    assert cli.main(["bench", "quality", *TINY, "--combiners", f"sum,{half_sum}", "--out", "report"]) == 0
    out = cwd / "report"
    page = (out / "benchmarks.md").read_text()
    assert "the cost section stays" in page and page.count("<!-- quality:begin -->") == 1
    assert f"zmagic bench quality --samples 4" in page and f"--combiners sum,{half_sum} --out report" in page
    for method in ("| none |", "| sum |", f"| {half_sum} |", "| oracle |"):
        assert method in page
    assert "plugin `test-bench-plugin`" in page  # the methods list says where the combiner came from
    results = json.loads((out / "benchmarks" / "quality.json").read_text())
    assert list(results["results"]["attr+mask"]) == ["none", "sum", half_sum, "oracle"]
    assert results["meta"]["combiners"] == ["sum", half_sum]
    assert HalfSum.calls == 5  # one batch of 4 samples, 5 steps: the registered combiner did the guiding
    half, plain = results["results"]["attr+mask"][half_sum][0], results["results"]["attr+mask"]["sum"][0]
    assert half["energy_step"]["red"] != plain["energy_step"]["red"]  # half the guidance, another trajectory
    assert len(linked_figures(page, out)) == 3  # no dependent combiner: no condition-cosine figure


def test_quality_skips_a_named_combiner_that_does_not_take_the_scenario(tmp_path):
    specs = report.parse_combiners("sum,dependent")
    methods, skipped = quality.plan(next(s for s in quality.SCENARIOS if s["name"] == "3 conditions"), specs, None)
    assert [m for m, _ in methods] == ["none", "sum", "oracle"] and skipped == {"dependent": "takes exactly 2 conditions"}
    methods, skipped = quality.plan(quality.SCENARIOS[0], specs, None)
    assert [m for m, _ in methods] == ["none", "sum", "dependent", "oracle"] and not skipped
    default, _ = quality.plan(quality.SCENARIOS[0], None, None)
    assert [m for m, _ in default] == quality.ALL_METHODS[:-1] + quality.STAGED_METHODS + ["oracle"]


def test_unknown_combiner_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "never"
    for which in ("quality", "cost"):
        assert cli.main(["bench", which, "--combiners", "sum,no-such-combiner", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zmagic: error:") and err.strip().count("\n") == 0, err
        assert "'no-such-combiner'" in err and "available:" in err and "sum" in err
    assert not out.exists()  # checked before anything ran or was written


def test_combiner_options_are_parsed_and_checked(half_sum):
    (cagrad, half) = report.parse_combiners(f"cagrad:c=0.8:hessian=false, {half_sum}:factor=0.25")
    assert (cagrad.label, cagrad.name, cagrad.options) == ("cagrad:c=0.8:hessian=false", "cagrad",
                                                           {"c": 0.8, "hessian": False})
    assert cagrad.build().c == 0.8 and half.build().factor == 0.25 and cagrad.accepts(4) and half.accepts(1)
    for bad, words in ((f"{half_sum}:bogus=1", "bogus"), ("cagrad:c=2", "less than 1"), ("sum,sum", "twice"),
                       ("oracle", "baseline"), ("cagrad:c", "key=value"), ("", "no combiner")):
        with pytest.raises(ConfigError, match=words) as info:
            report.parse_combiners(bad)
        assert "\n" not in str(info.value)


def test_quality_replot_redraws_from_the_json(tmp_path):
    out = tmp_path / "report"
    assert quality.main([*TINY, "--methods", "none", "sum", "oracle", "--out", str(out)]) == 0
    page = out / "benchmarks.md"
    before = page.read_text()
    write_section(page, "cost", "kept")
    for png in (out / "benchmarks").glob("*.png"):
        png.unlink()
    assert quality.main(["--replot", "--out", str(out)]) == 0
    after = page.read_text()
    assert "kept" in after and f"`zmagic bench quality --replot --out {out}` (no new sampling)" in after
    # the same section, plus the line saying it was re-drawn
    strip = lambda text: re.sub(r"\nFigures and this section re-drawn on .*\n", "", text.split("<!-- cost")[0])  # noqa: E731
    assert strip(after).strip() == before.strip()
    assert len(linked_figures(after, out)) == 3
    with pytest.raises(Exception, match="nothing to re-plot"):
        quality.main(["--replot", "--out", str(tmp_path / "empty")])


# -- outputs written atomically; numeric options checked at parsing --------------------------------------
_RECORD: dict = {"under": None, "writes": [], "hooked": False}


def _audit(event, args):
    """Records the files under _RECORD["under"] opened for writing (io.open, os.open, matplotlib's)."""
    if event != "open" or not _RECORD["under"] or not isinstance(args[0], (str, os.PathLike)):
        return
    path, mode, flags = args
    if ((flags or 0) & (os.O_WRONLY | os.O_RDWR) or any(c in (mode or "") for c in "wax+")) \
            and str(path).startswith(_RECORD["under"]):
        _RECORD["writes"].append(Path(path))


@pytest.fixture
def writes(tmp_path):
    """The files under tmp_path opened for writing during the test."""
    if not _RECORD["hooked"]:
        sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only while a test asks
        _RECORD["hooked"] = True
    _RECORD.update(under=str(tmp_path), writes=[])
    yield _RECORD["writes"]
    _RECORD["under"] = None


def test_bench_writes_its_page_figures_and_json_atomically(tmp_path, writes, monkeypatch):
    """Every file `zmagic bench` writes goes to a temporary name first (files/atomic.py), so a kill
    mid-write leaves the old page, figure or JSON whole, never a truncated one."""
    from zmagic_core.files.atomic import is_temporary

    out = tmp_path / "report"
    assert quality.main([*TINY, "--methods", "none", "sum", "oracle", "--out", str(out)]) == 0
    assert quality.main(["--replot", "--out", str(out)]) == 0
    monkeypatch.setattr(cost, "cvxpy_timings", lambda: [{"m": 6, "batch": 1, "median_ms_per_problem": 1.5}])
    assert cost.main(["--cvxpy-only", "--out", str(out)]) == 0
    assert [p for p in writes if not is_temporary(p)] == []
    finals = {p.name[1:].rsplit(".", 2)[0] for p in writes}  # .<name>.<pid>-<hex>.zmagic-tmp
    assert {"benchmarks.md", "quality.json", "cvxpy.json", "joint_satisfaction.png"} <= finals, finals
    assert "<!-- cvxpy:begin -->" in (out / "benchmarks.md").read_text()


@pytest.mark.parametrize("which,argv,expected", [
    ("quality", ["--samples", "0"], "argument --samples: must be at least 1, got 0"),
    ("quality", ["--samples", "-1"], "argument --samples: must be at least 1, got -1"),
    ("quality", ["--seeds-sets", "0"], "argument --seeds-sets: must be at least 1, got 0"),
    ("quality", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("quality", ["--sweep-samples", "0"], "argument --sweep-samples: must be at least 1, got 0"),
    ("quality", ["--defaults-samples", "-3"], "argument --defaults-samples: must be at least 1, got -3"),
    ("quality", ["--staging-samples", "0"], "argument --staging-samples: must be at least 1, got 0"),
    ("quality", ["--tuned-samples", "0"], "argument --tuned-samples: must be at least 1, got 0"),
    ("quality", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("quality", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("quality", ["--scale", "0"], "argument --scale: must be a finite number above 0, got 0"),
    ("quality", ["--scale", "nan"], "argument --scale: must be a finite number above 0, got nan"),
    ("quality", ["--staged-start", "-1"], "argument --staged-start: must be 0 or more, got -1"),
    ("quality", ["--samples", "2", "--seeds-sets", "4"], "--samples (2) must be at least --seeds-sets (4)"),
    ("cost", ["--n", "2", "0"], "argument --n: must be at least 1, got 0"),
    ("cost", ["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    ("cost", ["--steps", "-2"], "argument --steps: must be at least 1, got -2"),
    ("cost", ["--celebahq-size", "0"], "argument --celebahq-size: must be at least 1, got 0"),
    ("cost", ["--celebahq-steps", "0"], "argument --celebahq-steps: must be at least 1, got 0"),
    ("cost", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("cost", ["--steps", "x"], "argument --steps: expected an integer, got 'x'"),
])
def test_bench_refuses_a_count_out_of_range_in_one_line(tmp_path, capsys, which, argv, expected):
    """`--samples 0` once became 256 and `--samples -1` one sample per seed set: refused instead."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        {"quality": quality, "cost": cost}[which].main([*argv, "--out", str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"zmagic bench {which}: error: {expected}"
    assert not out.exists()


def test_quality_figures_match_a_direct_pipeline_run(world):
    scenario = quality.SCENARIOS[0]
    seeds = [0, 1, 2, 3]
    r = quality.run_method(world, scenario, "sum", seeds, 0.25, 5, 4)
    energies = [quality.build_energy(world, k, o) for _, k, o in scenario["conditions"]]
    conds = [Condition(n, e, "adaptive", 0.25) for (n, _, _), e in zip(scenario["conditions"], energies)]
    direct = Pipeline(world, DDPMSolver(), SumCombiner(), conds, 5).run(seeds, batch_size=4, progress=False)
    summary = evaluate_samples(world, direct.samples, energies, ["red", "mask"])["summary"]
    assert r["joint"] == summary["joint_satisfaction"]
    assert r["final_energy"] == pytest.approx(summary["mean_energy"])
    # the exact-gradient cosine is a real measurement: bounded, and different under another setting
    assert all(-1 <= c <= 1 for c in r["cos_exact_band"] if c == c)
    other = quality.run_method(world, scenario, "sum", seeds, 0.25, 6, 4)
    assert other["energy_step"]["red"][-1] != r["energy_step"]["red"][-1]
    # the oracle samples the reweighted mixture: no guidance, so no combined gradient is recorded
    oracle = quality.run_method(world, scenario, "oracle", seeds, 0.25, 5, 4)
    assert all(c != c for c in oracle["cos_exact_band"])
    # a combiner built through the registry runs the same as the built-in label
    (spec,) = report.parse_combiners("sum")
    named = quality.run_method(world, scenario, "sum", seeds, 0.25, 5, 4, spec.build)
    assert named["joint"] == r["joint"] and named["energy_step"] == r["energy_step"]


def test_quality_exact_gradient_is_the_oracle_score_difference(world):
    """The recorder's reference: s_cond - s equals autograd's grad log p(c|x_t) of the mixture."""
    scenario = quality.SCENARIOS[0]
    energies = [quality.build_energy(world, k, o) for _, k, o in scenario["conditions"]]
    from zmagic_core.models.shapes import target_log_weights

    lw = target_log_weights(world, energies)
    joint = world.conditioned(lw)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = 600
    abar = world._abar(t)
    logits = world._logits(x, abar, world.variance(abar))
    log_p = (torch.logsumexp(logits + lw.clamp_min(-1e4), 1) - torch.logsumexp(logits, 1)).sum()
    (grad,) = torch.autograd.grad(log_p, x)
    exact = joint.score(x.detach(), t) - world.score(x.detach(), t)
    assert torch.allclose(exact, grad, atol=1e-3, rtol=1e-3)


def test_band_of():
    assert [quality.band_of(t) for t in (990, 700, 699, 400, 399, 100, 99, 0)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_package_does_not_import_the_developer_scripts():
    """benchmarks/timing.py and benchmarks/real_architectures.py (repository root) are developer
    scripts, not part of the package: nothing in zmagic_core imports them."""
    import ast

    import zmagic_core

    scripts = {"timing", "real_architectures", "benchmarks"}
    for path in Path(zmagic_core.__file__).resolve().parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in scripts for m in modules), f"{path} imports {modules}"


# -- cost --------------------------------------------------------------------------------------------
def test_cost_counts_passes_and_matches_the_floor_structure():
    cases = ("sum", "dependent", "dependent-noH", "dependent-autograd", "dependent-paper", "cagrad-paper")
    rows = [cost.run_case("shapes", c, 2, 32, 2, 1, 1) for c in cases]
    passes = {r["combiner"]: r["passes"] for r in rows}
    assert passes["sum"] == {"forward": 1, "backward": 2, "double": 0}
    # every unbatched case counts exactly its floor: g2 at x_t (only the trace needs it) is not computed,
    # and the forward-difference product takes no double backward
    for case in cases:
        assert passes[case] == cost.floor(case, 2), case
    assert passes["dependent"] == {"forward": 3, "backward": 3, "double": 0}
    assert passes["dependent-paper"] == {"forward": 2, "backward": 3, "double": 1}
    three = cost.run_case("shapes", "sum", 3, 32, 2, 1, 1)
    assert three["passes"]["backward"] == 3 and three["seconds_per_step"] > 0
    assert cost.floor("cagrad-paper", 3) == {"forward": 4, "backward": 15, "double": 6}
    assert cost.floor("cagrad", 3) == {"forward": 10, "backward": 15, "double": 0}
    # the default CAGrad stacks every x_hat_i in one call and every difference point in another
    stacked = cost.run_case("shapes", "cagrad", 3, 32, 2, 1, 1)
    assert stacked["passes"] == {"forward": 3, "backward": 3 + 2 + 1, "double": 0}


def test_cost_under_ddim_skips_the_hessian_passes_the_bound_would_cut(tmp_path):
    cases = ("sum", "dependent", "dependent-noH", "dependent-autograd", "dependent-paper", "cagrad-paper")
    for case in cases:
        passes = cost.run_case("shapes", case, 2, 32, 2, 1, 1, solver="ddim")["passes"]
        assert passes == cost.floor(case, 2, "ddim"), case
    assert cost.floor("dependent", 2, "ddim") == cost.floor("dependent-noH", 2) == {"forward": 3, "backward": 2, "double": 0}
    assert cost.floor("cagrad", 3, "ddim") == {"forward": 10, "backward": 9, "double": 0}
    assert cost.floor("dependent-paper", 2, "ddim") == cost.floor("dependent-paper", 2)  # unbounded: keeps it
    stacked = cost.run_case("shapes", "cagrad", 3, 32, 2, 1, 1, solver="ddim")
    assert stacked["passes"] == {"forward": 3, "backward": 3 + 2, "double": 0}  # no backward at the difference points
    args = cost.parse(["--models", "shapes", "--n", "2", "--solver", "ddim", "--out", str(tmp_path)])
    text = cost.page_section(args, {"argv": ["--solver", "ddim"]}, [cost.run_case("shapes", "sum", 2, 32, 1, 1, 1, "ddim")], {})
    assert "50-step DDIM (eta = 0) schedule (t = 980, 960, ...)" in text and "trust region is empty" in text


def test_cost_runs_named_combiners(half_sum):
    combiners, specs = cost.labels(f"dependent,{half_sum}")
    assert combiners == ["sum", "dependent", half_sum]  # sum always runs: the ratios are to sum
    assert cost.cases(["shapes"], [2, 3], combiners, specs) == [
        ("shapes", "sum", 2), ("shapes", "dependent", 2), ("shapes", half_sum, 2),
        ("shapes", "sum", 3), ("shapes", half_sum, 3)]
    assert cost.cases(["shapes"], [3]) == [("shapes", "sum", 3), ("shapes", "cagrad", 3), ("shapes", "cagrad-paper", 3)]
    half = cost.run_case("shapes", half_sum, 2, 32, 1, 1, 1)
    assert half["passes"] == {"forward": 1, "backward": 2, "double": 0} and HalfSum.calls > 0
    named = cost.run_case("shapes", "cagrad:c=0.8:product=autograd:bound=none", 2, 32, 1, 1, 1)
    assert named["passes"] == {"forward": 3, "backward": 6, "double": 2}


def test_cost_page_section(tmp_path):
    args = cost.parse(["--models", "shapes", "--n", "2", "--steps", "1", "--out", str(tmp_path)])
    rows = [cost.run_case("shapes", c, 2, 32, 1, 1, 1) for c in ("sum", "dependent", "cagrad:c=0.8")]
    units = {"shapes": cost.unit_costs("shapes", 32, 1, 1, repeats=1)}
    text = cost.page_section(args, {"argv": ["--models", "shapes"], "wall": 1.0, "version": "9.9"}, rows, units)
    assert "| dependent | 2 | 3 | 3 | 0 | (3, 3, 0) |" in text
    assert "| cagrad:c=0.8 | 2 | 3 | 4 | 0 | - |" in text  # no floor for a registry combiner
    assert "Command: `zmagic bench cost --models shapes`" in text and "Code: zmagic-core 9.9" in text
    page = tmp_path / "page.md"
    write_section(page, "cost", text)
    write_section(page, "quality", "q")
    write_section(page, "cost", "replaced")
    content = page.read_text()
    assert content.count("<!-- cost:begin -->") == 1 and "replaced" in content and "q\n" in content


def test_cost_replot_rewrites_its_sections_from_the_json(tmp_path):
    out = tmp_path / "report"
    data = out / "benchmarks"
    data.mkdir(parents=True)
    rows = [cost.run_case("shapes", c, 2, 32, 1, 1, 1) for c in ("sum", "dependent-paper")]
    meta = {"argv": ["--models", "shapes", "--n", "2", "--out", "docs"], "date": "2030-01-01 00:00 UTC", "wall": 60.0,
            "machine": "a test machine", "version": "9.9",
            "args": {"models": ["shapes"], "n": [2], "batch": 1, "steps": 1, "celebahq_size": 64, "celebahq_steps": 1,
                     "threads": 1, "combiners": None}}
    (data / "cost.json").write_text(json.dumps({"rows": rows, "units": {}, "meta": meta}))
    (data / "cvxpy.json").write_text(json.dumps({"rows": [{"m": 6, "batch": 1, "median_ms_per_problem": 1.5}],
                                                 "meta": {**meta, "argv": ["--cvxpy-only"]}}))
    write_section(out / "benchmarks.md", "quality", "q")
    assert cost.main(["--replot", "--out", str(out)]) == 0
    page = (out / "benchmarks.md").read_text()
    assert "q\n" in page and "Command: `zmagic bench cost --models shapes --n 2 --out docs`" in page
    assert "Machine: a test machine" in page and "Date: 2030-01-01 00:00 UTC; wall time 1.0 min" in page
    assert "| dependent-paper | 2 | 2 | 3 | 1 | (2, 3, 1) |" in page and "### tiny-unet" not in page
    assert "Command: `zmagic bench cost --cvxpy-only`" in page and "| 1 | 1.500 |" in page
    assert page.count(f"by `zmagic bench cost --replot --out {out}` (no new measurement)") == 2
    with pytest.raises(Exception, match="nothing to re-write"):
        cost.main(["--replot", "--out", str(tmp_path / "empty")])


def test_docs_page_is_what_replot_writes(tmp_path):
    """docs/benchmarks.md's cost and cvxpy sections are what `zmagic bench cost --replot --out docs`
    writes from docs/benchmarks/*.json (checkout only)."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    if not (docs / "benchmarks" / "cost.json").exists():
        pytest.skip("not a checkout: no docs/")
    out = tmp_path / "docs"
    (out / "benchmarks").mkdir(parents=True)
    for name in ("cost.json", "cvxpy.json"):
        (out / "benchmarks" / name).write_text((docs / "benchmarks" / name).read_text())
    assert cost.main(["--replot", "--out", str(out)]) == 0
    section = lambda text, name: re.sub(  # noqa: E731
        r"\nThis section re-written on .*\n", "",
        text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0])
    ours, theirs = (out / "benchmarks.md").read_text(), (docs / "benchmarks.md").read_text()
    for name in ("cost", "cvxpy"):
        assert section(ours, name) == section(theirs, name)


def test_docs_quality_section_is_what_replot_writes():
    """docs/benchmarks.md's quality section is page_section() of docs/benchmarks/quality.json, and
    every figure it links to is there (checkout only; the figures themselves are not redrawn here)."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    if not (docs / "benchmarks" / "quality.json").exists():
        pytest.skip("not a checkout: no docs/")
    saved = json.loads((docs / "benchmarks" / "quality.json").read_text())
    meta = saved["meta"]
    assert meta["argv"][-2:] == ["--out", "docs"]  # produced with the docs folder as the target
    args = quality.parse([])
    for key in ("samples", "seeds_sets", "steps"):
        setattr(args, key, meta[key])
    scenarios = [s for s in quality.SCENARIOS if s["name"] in saved["results"]]
    assert len(scenarios) == len(saved["results"]) == len(quality.SCENARIOS)
    figures = {"energies": {quality.slug(s["name"]): f"energies_{quality.slug(s['name'])}.png" for s in scenarios},
               "joint": "joint_satisfaction.png", "cosine_conditions": "cosine_conditions.png",
               "cosine_exact": "cosine_exact.png"}
    text = quality.page_section(args, meta, saved["scale"], saved["sweep"], saved["results"], scenarios, figures)
    text += "\n".join([""] + quality.tuned_section(saved.get("tuned"), saved["results"], saved["scale"]))
    page = (docs / "benchmarks.md").read_text()
    section = page.split("<!-- quality:begin -->\n")[1].split("<!-- quality:end -->")[0]
    assert re.sub(r"\nFigures and this section re-drawn on .*\n", "", section).strip() == text.strip()
    assert len(linked_figures(section, docs)) == len(scenarios) + 3


def test_ddim_pull_script_writes_its_report_and_calibrates_by_the_least_gap(tmp_path, monkeypatch):
    """benchmarks/ddim_pull.py (the calibration of DDIM's default pull): the report runs end to end on a
    few samples; the calibration picks the factor with the least mean |TV(DDIM-50) - TV(DDPM-100)|, ties to
    the smaller one; its candidates include the solver's MATCHED_GAIN."""
    import argparse
    import importlib.util
    import json
    import subprocess
    import sys

    from zmagic_core.method.solvers import MATCHED_GAIN, DDIMSolver

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "ddim_pull.py"
    out = tmp_path / "ddim.json"
    done = subprocess.run([sys.executable, str(script), "--part", "report", "--sets", "1", "--samples", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(out.read_text())["report"]) == {
        f"{m} | {c}" for m in ("sum", "dep 1>2") for c in ("ddpm-100", "ddim-50 raw", "ddim-50 consistent", "ddim-50 matched")}

    spec = importlib.util.spec_from_file_location("ddim_pull", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert MATCHED_GAIN in module.FACTORS and DDIMSolver().guidance_gain(0.3, 0.4) == MATCHED_GAIN

    def fake_tv(world, conditions, method, solver, steps, scale, seeds):  # DDPM at 0.5; DDIM equal to it at 0.2, 0.25
        if isinstance(solver, module.FactorDDIM):
            return (0.5 if solver.factor in (0.2, 0.25) else 0.5 + solver.factor), 1.0
        return 0.5, 1.0

    monkeypatch.setattr(module, "tv", fake_tv)
    found = module.calibrate(None, argparse.Namespace(sets=1, samples=2, scale=0.5), lambda msg: None)
    assert found["chosen"] == 0.2 and found["mean_gap"]["0.25"] == 0.0


def test_gpu_script_runs_every_case_on_tiny_models_and_prints_its_table(tmp_path):
    """benchmarks/gpu_combiners.py end to end on the CPU (tiny pixel UNet, the cases of one architecture
    sharing a subprocess, as on CUDA): a row per case, all finite, ratios to sum in the table, the JSON
    rows written."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_combiners.py"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--arch", "pixel",
                           "--process-per", "group", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    module_cases = [line for line in script.read_text().splitlines() if line.startswith('    ("')]
    assert len(rows) == len(module_cases) >= 8
    assert all(r["finite"] and r["errors"] == 0 and r["s_per_step"] > 0 for r in rows)
    table = [line for line in done.stdout.splitlines() if line.startswith("| pixel")]
    assert len(table) == len(rows)
    assert all(line.split("|")[6].strip() == "1.00" for line in table if "| sum |" in line)
    assert "cagrad stack=1" in done.stdout


def test_cagrad_stage_script_splits_a_step_into_its_stages(tmp_path):
    """benchmarks/cagrad_stages.py on the tiny UNet: sum's step is its pass at x_t; CAGrad's has the x_hat and
    difference stages and the solve, and the stages add up to the step."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cagrad_stages.py"
    out = tmp_path / "stages.json"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny-unet", "--size", "16", "--steps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["network_per_row"]) == {"1", "3", "6"}
    sum_case, cagrad = data["cases"]
    assert sum_case["stages"].get("x_hat points", 0.0) == 0.0 and sum_case["stages"]["pass at x_t"] > 0
    assert all(cagrad["stages"][k] > 0 for k in ("pass at x_t", "x_hat points", "difference points"))
    assert abs(sum(cagrad["stages"].values()) - cagrad["seconds_per_step"]) < 1e-9
    assert "| cagrad |" in done.stdout and "| forward |" in done.stdout
