"""The sampling loop: a base model, a solver, a combiner and conditions, assembled at run time.

Every sample draws its noise from its own seeded generator, so a sample's result does not
depend on which batch it ran in; that is what makes runs reproducible and resumable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from zmagic_core.method.combiners import SumCombiner, cosine
from zmagic_core.contracts.components import Combiner, DiffusionModel, Solver
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.method.guidance import Condition, GuidanceStep, evaluate
from zmagic_core.method.schedule import Schedule


class SampleNoise:
    """Standard normal draws for a batch, one generator per sample seed."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def draw(self) -> torch.Tensor:
        z = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(z).to(self.device)


@dataclass
class RunResult:
    """Final samples (model space), decoded images in [-1, 1], and a per-sample trace."""

    seeds: list[int]
    samples: torch.Tensor
    images: torch.Tensor
    trace: list[list[dict]]
    condition_names: list[str]
    errors: dict[int, str] = field(default_factory=dict)  # seed -> message, for samples that failed
    notes: list[str] = field(default_factory=list)  # what went differently (a batch rerun sample by sample)


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


class Pipeline:
    """Guided sampling: x_t' = Phi_t(x_t, s(x_t) + G, z), G from the combiner each step."""

    def __init__(self, model: DiffusionModel, solver: Solver, combiner: Combiner,
                 conditions: list[Condition], steps: int = 100, device: Optional[torch.device] = None,
                 corrector_combiner: Optional[Combiner] = None):
        self.model, self.solver, self.combiner = model, solver, combiner
        # Langevin corrector moves (pc solver) are guided by this combiner; FreeDoM's sum by default.
        self.corrector_combiner = corrector_combiner or SumCombiner()
        given = list(model.model_conditions()) + list(conditions)
        # copies with unique names: the caller's Condition objects are never renamed
        self.conditions = [dataclasses.replace(c, name=n) for c, n in zip(given, unique_names([c.name for c in given]))]
        n = len(self.conditions)
        if n and n < combiner.min_conditions or n and (combiner.max_conditions is not None and n > combiner.max_conditions):
            raise ConfigError(f"combiner {type(combiner).__name__} takes between {combiner.min_conditions} and "
                              f"{combiner.max_conditions or 'any number of'} conditions, got {n}")
        self.schedule = Schedule(model.alphas_cumprod, steps)
        self.device = device or next((b.device for b in model.buffers()), torch.device("cpu"))

    # -- running ---------------------------------------------------------------------------------
    def run(self, seeds: list[int], batch_size: int = 8, progress: bool = True,
            callback: Optional[Callable[[dict], None]] = None) -> RunResult:
        """Sample one image per seed; a batch that fails is retried sample by sample."""
        samples, images, traces, errors, done, notes = [], [], [], {}, [], []
        for start in range(0, len(seeds), batch_size):
            batch = list(seeds[start:start + batch_size])
            try:
                parts = [(batch, self._run_batch(batch, progress, callback))]
            except (KeyboardInterrupt, ConfigError):
                raise
            except Exception as exc:
                if len(batch) == 1:
                    errors[batch[0]] = failure_message(exc)
                    continue
                # said even if every sample then runs alone: a batch that fails is slower, or a bug
                notes.append(f"the batch of seeds {batch[0]}..{batch[-1]} failed ({failure_message(exc)}); its "
                             "samples were run one by one")
                parts = []
                for seed in batch:  # isolate the failing sample; keep the others
                    try:
                        parts.append(([seed], self._run_batch([seed], progress, callback)))
                    except (KeyboardInterrupt, ConfigError):
                        raise
                    except Exception as inner:
                        errors[seed] = failure_message(inner)
            for part_seeds, (x, img, trace) in parts:
                done += part_seeds
                samples.append(x)
                images.append(img)
                traces += trace
        empty = torch.empty(0, *self.model.sample_shape)
        return RunResult(done, torch.cat(samples) if samples else empty,
                         torch.cat(images) if images else empty, traces,
                         [c.name for c in self.conditions], errors, notes)

    def _run_batch(self, seeds, progress, callback):
        noise = SampleNoise(seeds, tuple(self.model.sample_shape), self.device)
        x = noise.draw()
        trace: list[list[dict]] = [[] for _ in seeds]
        steps = list(self.schedule.pairs())
        for i, t, t_next in tqdm(steps, disable=not progress, leave=False, desc="sampling"):
            abar_t, abar_next = self.schedule.abar(t), self.schedule.abar(t_next)
            active = [c for c in self.conditions if c.active(t)]
            repeats = max([c.time_travel for c in active], default=0)
            passes = []
            for r in range(repeats + 1):
                z = noise.draw() if t_next >= 0 else torch.zeros_like(x)  # no noise on the final step
                x_next, record = self._step(x, t, t_next, abar_t, abar_next, z, active)
                passes.append(record)
                if self.solver.corrector_steps and t_next >= 0:
                    x_next = self._correct(x_next, t_next, abar_next, noise)
                if r < repeats:  # time travel: back to level t, then redo the step
                    x = Schedule.renoise(x_next, noise.draw(), abar_t, abar_next)
            record = _with_earlier_problems(passes)
            x = x_next.detach()
            for b, rec in enumerate(record):
                trace[b].append({"step": i, "t": t, **rec})
            if callback is not None:
                callback({"step": i, "t": t, "x": x, "record": record})
        with torch.no_grad():
            images = self.model.decode(x).float().clamp(-1, 1)
        return x.cpu(), images.cpu(), trace

    def _step(self, x, t, t_next, abar_t, abar_next, z, active):
        """One guided step; returns x_t' and the per-sample trace records."""
        step = GuidanceStep(self.model, self.solver, active, x, t, t_next, abar_t, abar_next, z)
        if active:
            combined = self.combiner.combine(step)
            if not torch.is_tensor(combined.guidance) or combined.guidance.shape != x.shape:
                got = tuple(combined.guidance.shape) if torch.is_tensor(combined.guidance) else type(combined.guidance)
                raise ConfigError(f"combiner {type(self.combiner).__name__}: its guidance has shape {got}; it must have "
                                  f"the shape of x_t, {tuple(x.shape)} (one row per sample)")
            ev = step.base()
            guidance = combined.guidance.detach()
            if not torch.isfinite(guidance).all() and any(g is None for g in ev.grads):
                ev = step.base(guided=[True] * len(active))  # the fallback needs every g_i at x_t
            guidance, fallback = _finite_or_fallback(guidance, ev.grads)
        else:
            ev = evaluate(self.model, x, t, abar_t, self.conditions, [False] * len(self.conditions))
            guidance, fallback, combined = torch.zeros_like(x), [None] * x.shape[0], None
        with torch.no_grad():
            x_next = self.solver.step(x, ev.score.detach() + guidance, z, abar_t, abar_next)
        return x_next, self._records(x, ev, step, active, guidance, fallback, combined)

    def _records(self, x, ev, step, active, guidance, fallback, combined):
        energies: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        for c, e, g in zip(step.conditions, ev.energies, ev.grads):
            energies[c.name], grads[c.name] = e, (None if g is None else g.detach())
        if not active:  # nothing guided: energies were computed for every condition at x_t
            energies = {c.name: e for c, e in zip(self.conditions, ev.energies)}
        else:
            with torch.no_grad():
                for c in self.conditions:
                    if c.name not in energies:
                        energies[c.name] = c.energy_only(ev)
        names = [c.name for c in active if grads.get(c.name) is not None]  # a combiner may skip some g_i at x_t
        cos = {f"{a}~{b}": cosine(grads[a], grads[b]) for k, a in enumerate(names) for b in names[k + 1:]}
        extra = {}
        if combined is not None:
            extra = {k: v for k, v in combined.info.items() if torch.is_tensor(v) and v.ndim == 1}
        gnorm = guidance.flatten(1).norm(dim=1)
        # a guided condition whose energy or gradient is not finite for a sample did not guide it
        finite = {n: torch.isfinite(energies[n]) & torch.isfinite(g.flatten(1)).all(1)
                  for n, g in grads.items() if g is not None}
        records = []
        for b in range(x.shape[0]):
            disabled = [n for n, ok in finite.items() if not bool(ok[b])]
            records.append({
                "energy": {n: float(e[b]) for n, e in energies.items()},
                "grad_norm": {n: float(g[b].norm()) for n, g in grads.items() if g is not None},
                "cosine": {k: float(v[b]) for k, v in cos.items()},
                "guidance_norm": float(gnorm[b]),
                **{k: float(v[b]) for k, v in extra.items()},
                **({"fallback": fallback[b]} if fallback[b] else {}),
                **({"disabled": disabled} if disabled else {}),
            })
        return records

    def _correct(self, x, t_next, abar_next, noise):
        """Langevin corrector moves at level t', guided by the sum of the active conditions."""
        active = [c for c in self.conditions if c.active(t_next)]
        for _ in range(self.solver.corrector_steps):
            step = GuidanceStep(self.model, self.solver, active, x, t_next, t_next, abar_next, abar_next,
                                torch.zeros_like(x))
            ev = step.base()
            guidance = self.corrector_combiner.combine(step).guidance if active else 0.0
            x = self.solver.correct(x, ev.score.detach() + guidance, noise.draw()).detach()
        return x


MEMORY_HINT = ("less memory: batch_size 1, dtype float16/bfloat16, the model's gradient_checkpointing, "
               "the combiner's stack (docs/models.md, 'Memory')")


def failure_message(exc: BaseException) -> str:
    """A failed sample's one line: the error, and for running out of memory what lowers it."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return f"{text} [{MEMORY_HINT}]" if isinstance(exc, torch.OutOfMemoryError) else text


def _with_earlier_problems(passes: list[list[dict]]) -> list[dict]:
    """A step's records: the last pass's, keeping a fallback or a disabled condition of an earlier time-travel
    pass (a problem of any pass is reported, not only the last one's)."""
    last = passes[-1]
    for earlier in passes[:-1]:
        for rec, before in zip(last, earlier):
            if "fallback" in before:
                rec.setdefault("fallback", before["fallback"])
            if "disabled" in before:
                rec["disabled"] = sorted(set(rec.get("disabled", [])) | set(before["disabled"]))
    return last


def _finite_or_fallback(guidance: torch.Tensor, grads: list) -> tuple[torch.Tensor, list]:
    """Per sample: a non-finite G is replaced by the sum of the finite g_i, or by zero."""
    flat = guidance.flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    fallback: list = [None] * guidance.shape[0]
    if not bad.any():
        return guidance, fallback
    guidance = guidance.clone()
    for b in bad.nonzero().squeeze(1).tolist():
        parts = [g[b].detach() for g in grads if g is not None and torch.isfinite(g[b]).all()]
        guidance[b] = torch.stack(parts).sum(0) if parts else torch.zeros_like(guidance[b])
        fallback[b] = "sum-of-finite" if parts else "zero"
    return guidance, fallback
