"""The benchmarks run on a tiny setting and their figures come from real runs."""
import json

import pytest
import torch

from zmagic_core.app.bench import cost, quality
from zmagic_core.app.bench.report import write_section
from zmagic_core.method.combiners import SumCombiner
from zmagic_core.method.guidance import Condition
from zmagic_core.sampling.pipeline import Pipeline
from zmagic_core.models.shapes import ShapesModel, evaluate_samples
from zmagic_core.method.solvers import DDPMSolver


@pytest.fixture(scope="module")
def world():
    return ShapesModel(32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quality_main_writes_page_figures_and_json(tmp_path):
    out = tmp_path / "benchmarks"
    argv = ["--samples", "4", "--seeds-sets", "2", "--steps", "5", "--scale", "0.25", "--scenarios", "attr+mask",
            "--methods", "none", "sum", "dep 1>2", "oracle", "--out", str(out)]
    assert quality.main(argv) == 0
    page = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- quality:begin -->" in page and "zmagic bench quality -- --samples 4" in page
    for method in ("| none |", "| sum |", "| dep 1>2 |", "| oracle |"):
        assert method in page
    for name in ("joint_satisfaction.png", "cosine_conditions.png", "cosine_exact.png", "energies_attr_mask.png"):
        assert (out / name).stat().st_size > 1000
    data = json.loads((out / "quality.json").read_text())
    runs = data["results"]["attr+mask"]["sum"]
    assert len(runs) == 2 and runs[0]["seeds"] == [0, 1] and runs[1]["seeds"] == [1000, 1001]
    assert len(runs[0]["energy_step"]["red"]) == 5


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


def test_cost_counts_passes_and_matches_the_floor_structure():
    rows = [cost.run_case("shapes", c, 2, 32, 2, 1, 1) for c in ("sum", "dependent", "dependent-noH")]
    passes = {r["combiner"]: r["passes"] for r in rows}
    assert passes["sum"] == {"forward": 1, "backward": 2, "double": 0}
    # the dependent floor (2, 3, 1) plus g2 at x_t, which the core computes for the trace
    assert passes["dependent"] == {"forward": 2, "backward": 4, "double": 1}
    assert passes["dependent-noH"] == {"forward": 2, "backward": 4, "double": 0}
    three = cost.run_case("shapes", "sum", 3, 32, 2, 1, 1)
    assert three["passes"]["backward"] == 3 and three["seconds_per_step"] > 0
    assert cost.floor("cagrad", 3) == {"forward": 4, "backward": 15, "double": 6}


def test_cost_page_section(tmp_path):
    args = cost.parse(["--models", "shapes", "--n", "2", "--steps", "1", "--out", str(tmp_path)])
    rows = [cost.run_case("shapes", c, 2, 32, 1, 1, 1) for c in ("sum", "dependent")]
    units = {"shapes": cost.unit_costs("shapes", 32, 1, 1, repeats=1)}
    text = cost.page_section(args, ["--models", "shapes"], rows, units, 1.0)
    assert "| dependent | 2 | 2 | 4 | 1 | (2, 3, 1) |" in text
    page = tmp_path / "page.md"
    write_section(page, "cost", text)
    write_section(page, "quality", "q")
    write_section(page, "cost", "replaced")
    content = page.read_text()
    assert content.count("<!-- cost:begin -->") == 1 and "replaced" in content and "q\n" in content
