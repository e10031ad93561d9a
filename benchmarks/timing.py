"""Small timing helpers shared by the benchmark scripts (the core's and the plugins')."""
from __future__ import annotations

import time

import torch


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn()`` after one warm-up call.

    On a shared machine wall time includes waiting for cores; with one thread the process CPU
    time is the best estimate of the unloaded cost."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def gflops(fn) -> float:
    """Floating-point operations of one ``fn()`` call, in GFLOP (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def forward_backward(net, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of net(x).sum().backward() on random (batch, 3, size, size) input."""
    x = torch.rand(batch, 3, size, size) * 2 - 1
    times = []
    for i in range(repeats + 1):  # the first call warms up (allocations, oneDNN kernels)
        xi = x.clone().requires_grad_(True)
        start = time.perf_counter()
        net(xi).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times), sorted(times)[len(times) // 2]
