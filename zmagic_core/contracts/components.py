"""The interfaces every component implements: base models, energies, solvers and combiners.

Plugins subclass these (or follow them by duck typing); the pipeline only talks to them.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # annotation names only
    from zmagic_core.method.guidance import Condition, GuidanceStep


@dataclass
class BuildContext:
    """What a factory may need: where to put tensors, and the base model once it exists."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    model: Optional["DiffusionModel"] = None
    seed: int = 0


@dataclass
class Prediction:
    """What guidance needs from the base model at one point (x_t, t), from one call.

    ``eps``: the noise prediction (float32, shaped like x_t) whose score -eps / sqrt(1 - abar_t) the
    solver steps with; ``x0``: the clean estimate (model space) that the energies see through
    :meth:`DiffusionModel.decode`; ``extras``: tensors computed at this point that the model's own
    conditions reuse (Stable Diffusion: the prompt's prediction ``eps_cond``).
    """

    eps: torch.Tensor
    x0: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class DiffusionModel(nn.Module, metaclass=abc.ABCMeta):
    """An epsilon-prediction network eps(x_t, t) on a discrete VP schedule.

    Subclasses set ``alphas_cumprod`` (a float64 buffer of length T) and ``sample_shape``
    (the shape of one x_t), implement :meth:`eps`, and, for latent models, :meth:`decode`
    and :meth:`encode`.  Guidance calls :meth:`predict` once per point; energies always see
    ``decode(prediction.x0)``: images in [-1, 1], float32.  No call depends on an earlier one.
    """

    sample_shape: tuple[int, ...] = ()
    alphas_cumprod: torch.Tensor

    @abc.abstractmethod
    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The network's noise prediction at level t, float32, shaped like x_t."""

    def predict(self, x_t: torch.Tensor, t: int) -> Prediction:
        """eps and the clean estimate at (x_t, t); the default is Tweedie's formula on :meth:`eps`
        (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), METHOD.md section 1)."""
        abar = float(self.alphas_cumprod[t])
        eps = self.eps(x_t, t)
        return Prediction(eps, (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space to images in [-1, 1] (identity for pixel models)."""
        return x0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def model_conditions(self) -> list["Condition"]:
        """Conditions the model itself provides (a text prompt), placed before the recipe's."""
        return []

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


class Energy(nn.Module, metaclass=abc.ABCMeta):
    """E(images) >= 0, one value per sample; images are (B, 3, H, W) in [-1, 1].

    Must be differentiable in the images.  Problems with references (missing file, no face)
    are raised by the factory, before sampling starts.
    """

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Energies (B,) of images (B, 3, H, W) in [-1, 1]."""


class Solver(abc.ABC):
    """A reverse step as a map x_t' = Phi_t(x_t, score, z), differentiable in x_t and score."""

    corrector_steps: int = 0

    @abc.abstractmethod
    def step(self, x: torch.Tensor, score: torch.Tensor, z: torch.Tensor,
             abar_t: float, abar_next: float) -> torch.Tensor:
        """x_t' from x_t, the (guided) score and this step's noise z."""

    def correct(self, x: torch.Tensor, score: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One corrector move at the new level (predictor-corrector solvers only)."""
        return x

    def guidance_gain(self, abar_t: float, abar_next: float) -> float:
        """Factor on the energies' step sizes so that guidance moves x_t' as far as in the
        ancestral step (beta_eff * G) whatever the solver and the step count; 1 for the ancestral form."""
        return 1.0


@dataclass
class Combined:
    """A combiner's answer for one step: the guidance G (added to the score) and diagnostics."""

    guidance: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Combiner(abc.ABC):
    """Turns the per-condition guidance into one G for the step (see guidance.GuidanceStep)."""

    min_conditions: int = 1
    max_conditions: Optional[int] = None

    @abc.abstractmethod
    def combine(self, step: "GuidanceStep") -> Combined:
        """The guidance G for this step."""



@dataclass
class FinishedRun:
    """What an evaluator sees of a run: the built model and conditions, and every finished sample."""

    recipe: dict                 # the resolved recipe (JSON form)
    model: "DiffusionModel"
    conditions: list["Condition"]
    samples: torch.Tensor        # (N, *sample_shape) in model space
    images: torch.Tensor         # (N, 3, H, W) decoded, in [-1, 1]
    indices: list[int]           # sample index of each row


class Evaluator(abc.ABC):
    """Per-run metrics from the finished samples, stored under ``record["evaluation"][name]``.

    :meth:`applies_to` is asked with the recipe before anything is built, so an evaluator that
    does not apply costs nothing; :meth:`evaluate` returns a JSON-serialisable dict.
    """

    @abc.abstractmethod
    def applies_to(self, recipe: dict) -> bool:
        """Whether this run (its resolved recipe, JSON form) gets these metrics."""

    @abc.abstractmethod
    def evaluate(self, run: FinishedRun) -> dict:
        """The metrics of the run."""
