"""When to force the MATH attention kernel, and gradient checkpointing that keeps that choice.

Double backward (the Hessian term of the dependent and cagrad combiners: g_1 is built with
``create_graph=True`` and differentiated again) fails through PyTorch's fused attention
kernels: ``_scaled_dot_product_flash_attention_for_cpu_backward`` (CPU) and the CUDA flash /
memory-efficient backward kernels have no derivative.  The MATH kernel is plain autograd maths
and is twice differentiable, at the cost of materialising the attention matrix.

Policy (option ``attention`` of the diffusers model kinds):

* ``auto`` (default): MATH only while grad mode is on and a double backward may follow.  On the
  CPU that is every grad-mode pass (the fused CPU kernel gains little).  On CUDA it is only a
  pass that keeps its graph for a second derivative: inside
  ``zmagic_core.method.guidance.double_backward_pass(True)``, which the core's ``evaluate`` declares
  whenever one of its conditions asks for ``create_graph``.  Plain inference and first-order
  guidance keep the fast kernels.
* ``math``: always MATH.  ``default``: never force anything (PyTorch chooses).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from zmagic_core.method.guidance import double_backward_expected, double_backward_pass  # noqa: F401  (re-exported)

ATTENTION_POLICIES = ("auto", "math", "default")

_MATH_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("zmagic_math_active", default=False)


def use_math_kernel(device: torch.device, policy: str = "auto") -> bool:
    """Whether the next network pass on ``device`` should run with the MATH attention kernel."""
    if policy == "math":
        return True
    if policy == "default" or not torch.is_grad_enabled():
        return False
    if torch.device(device).type == "cpu":
        return True
    return bool(double_backward_expected())


@contextlib.contextmanager
def attention_context(device: torch.device, policy: str = "auto"):
    """Run a forward pass under the kernel choice of :func:`use_math_kernel`.

    The choice is remembered (for :func:`checkpoint_function`, whose recomputation runs later,
    during backward, outside this block)."""
    if not use_math_kernel(device, policy):
        yield False
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    token = _MATH_ACTIVE.set(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield True
    finally:
        _MATH_ACTIVE.reset(token)


class _ReusableMath:
    """A re-enterable MATH-kernel block (a recomputation may run more than once)."""

    def __enter__(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._stack = getattr(self, "_stack", [])
        cm = sdpa_kernel(SDPBackend.MATH)
        cm.__enter__()
        self._stack.append(cm)
        return self

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


def _math_contexts():
    return _ReusableMath(), _ReusableMath()


def checkpoint_function(module, *args):
    """Gradient checkpointing for diffusers blocks (``enable_gradient_checkpointing(fn)``).

    Non-reentrant checkpointing (which supports ``torch.autograd.grad`` and double backward);
    when the forward ran under the MATH kernel, the recomputation during backward does too.
    """
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    context_fn = _math_contexts if _MATH_ACTIVE.get() else noop_context_fn
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)
