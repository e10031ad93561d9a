"""Algorithm 2's dual against independent reference solutions."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from zmagic_core.method.cagrad import cagrad_direction, cagrad_weights, cagrad_weights_batch, simplex_problem


def dual_objective(w, K, c):
    g0_sq = K.mean()
    return (K.mean(1) @ w) + c * np.sqrt(g0_sq) * np.sqrt(max(w @ K @ w, 0.0))


def reference_minimum(K, c, rng, starts=20):
    """SLSQP from many random starts on the same dual, plus random points of the simplex."""
    m = K.shape[0]
    best = np.inf
    cons = ({"type": "eq", "fun": lambda w: w.sum() - 1.0},)
    for _ in range(starts):
        w0 = rng.dirichlet(np.ones(m))
        res = minimize(dual_objective, w0, args=(K, c), method="SLSQP", bounds=[(0, 1)] * m,
                       constraints=cons, options={"ftol": 1e-12, "maxiter": 500})
        if res.success:
            best = min(best, dual_objective(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum(), K, c))
    samples = rng.dirichlet(np.ones(m) * 0.3, size=4000)
    best = min(best, min(dual_objective(w, K, c) for w in samples))
    return best


@pytest.mark.parametrize("m,dim", [(2, 5), (3, 10), (6, 40), (12, 30)])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cvxpy_solution_matches_reference(m, dim, c):
    rng = np.random.default_rng(m * 100 + dim)
    G = rng.normal(size=(m, dim)) + rng.normal(size=dim)  # correlated, as pair gradients are
    K = G @ G.T
    w = cagrad_weights(K, c)
    assert w.min() >= -1e-9 and abs(w.sum() - 1) < 1e-6
    scale = np.trace(K) / m
    ours = dual_objective(w, K / scale, c)
    ref = reference_minimum(K / scale, c, rng)
    assert ours <= ref + 1e-5 * abs(ref) + 1e-7
    assert ours >= ref - 1e-3 * abs(ref) - 1e-6  # the reference is a true upper bound on the optimum


@pytest.mark.parametrize("c", [0.3, 0.6])
def test_direction_solves_the_primal(c):
    """d = argmax_{||d - g0|| <= c||g0||} min_i <g_i, d>: check the constraint and optimality by sampling."""
    rng = np.random.default_rng(1)
    G = torch.tensor(rng.normal(size=(6, 8)) + 0.5, dtype=torch.float64)
    d, _ = cagrad_direction(G, c)
    g0 = G.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)
    worst = (G @ d).min()
    radius = c * g0.norm()
    for _ in range(3000):
        u = torch.tensor(rng.normal(size=8))
        cand = g0 + radius * u / u.norm() * rng.uniform() ** (1 / 8)
        assert (G @ cand).min() <= worst + 1e-6


def test_c_zero_gives_the_mean():
    G = torch.randn(6, 20, dtype=torch.float64)
    d, w = cagrad_direction(G, 0.0)
    torch.testing.assert_close(d, G.mean(0))
    np.testing.assert_allclose(w, np.full(6, 1 / 6))


def test_rescale_options():
    G = torch.randn(4, 10, dtype=torch.float64)
    d, _ = cagrad_direction(G, 0.5)
    d2, _ = cagrad_direction(G, 0.5, "1/(1+c^2)")
    d3, _ = cagrad_direction(G, 0.5, "1/(1+c)")
    torch.testing.assert_close(d2, d / 1.25)
    torch.testing.assert_close(d3, d / 1.5)


def test_problem_compiled_once_per_size():
    p1 = simplex_problem(1, 6)
    before = p1.solves
    for _ in range(3):
        cagrad_weights(np.eye(6) + 0.1, 0.5)
    assert simplex_problem(1, 6) is p1 and p1.solves == before + 3


def test_batched_problems_equal_separate_ones():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(5, 4, 12)) + rng.normal(size=12)
    grams = G @ G.transpose(0, 2, 1)
    grams[2] = 0.0  # a sample with vanishing gradients falls back to the mean, alone
    batched = cagrad_weights_batch(grams, 0.5)
    for b in range(5):  # same optimum; the argmin itself is only as sharp as the objective's curvature
        single = cagrad_weights(grams[b], 0.5)
        K = grams[b] / max(np.trace(grams[b]) / 4, 1e-30)
        assert abs(dual_objective(batched[b], K, 0.5) - dual_objective(single, K, 0.5)) < 1e-6 * (1 + abs(dual_objective(single, K, 0.5)))
        np.testing.assert_allclose(batched[b], single, atol=2e-3)
    np.testing.assert_allclose(batched[2], np.full(4, 0.25))


def test_degenerate_gradients_do_not_crash():
    d, w = cagrad_direction(torch.zeros(3, 5, dtype=torch.float64), 0.5)
    assert torch.isfinite(d).all() and d.abs().sum() == 0


def test_weights_do_not_depend_on_what_was_solved_before():
    """Every solve starts cold (cvxpy's warm start off): a sample's weights must not depend on the problems
    solved before it in the process, or a resumed run (a fresh process) would differ from an uninterrupted one."""
    from zmagic_core.method import cagrad

    rng = np.random.default_rng(0)
    grams = []
    for _ in range(12):
        g = rng.standard_normal((3, 40))
        g[1] = -0.9 * g[0] + 0.1 * g[1]  # conflicting pairs: the solver's path matters most there
        grams.append((g @ g.T)[None])
    forward = [cagrad_weights_batch(k, 0.5) for k in grams]
    cagrad._PROBLEMS.clear()
    backward = [cagrad_weights_batch(k, 0.5) for k in grams[::-1]][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)


def test_each_samples_trace_shows_its_pair_weights():
    """CAGrad's w* per sample and step reaches the trace, one entry per ordered pair, named by the conditions."""
    from zmagic_core.assembly.build import build_pipeline, load_recipe
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "three-conditions.yaml"
    pipe = build_pipeline(load_recipe(recipe, ["solver.steps=3"]))
    result = pipe.run([0, 1], batch_size=2, progress=False)
    for sample in result.trace:
        for rec in sample:
            active = list(rec["grad_norm"])  # the style condition stops at t = 100
            weights = {k: v for k, v in rec.items() if k.startswith("w(")}
            assert set(weights) == {f"w({a}>{b})" for a in active for b in active if a != b}
            assert min(weights.values()) >= -1e-6 and abs(sum(weights.values()) - 1.0) < 1e-4
    assert any(len(rec["grad_norm"]) == 3 for rec in result.trace[0])
    mean = build_pipeline(load_recipe(recipe, ["solver.steps=2", "combiner.c=0"])).run([0], progress=False)
    assert not any(k.startswith("w(") for rec in mean.trace[0] for k in rec)  # c = 0: every weight 1/m, not traced
