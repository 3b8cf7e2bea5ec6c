"""Timing, peak memory and FLOP counting for :mod:`medad_monai.benchmarks`.

- :func:`interleaved_times`: the candidates of one comparison run in turn within each repetition (their order
  alternating between repetitions), so that a slow phase of a shared machine hits all of them alike; the medians are
  compared.
- :func:`peak_memory`: the extra memory one call needs at its peak. CUDA: ``torch.cuda.max_memory_allocated`` minus
  what was allocated before. CPU (Linux): the process's resident high-water mark (``VmHWM``), reset through
  ``/proc/self/clear_refs`` after returning freed heap pages to the system (``malloc_trim``), minus the resident size
  before the call; so it counts every allocation (torch's, oneDNN's, Python's), not only tensors.
- :func:`count_flops`: matmul/convolution/attention FLOPs of one call (``torch.utils.flop_counter``), with fused
  attention evaluated by its math backend so that fused and unfused attention count alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["synchronize", "repeat_calls", "repeated", "interleaved_times", "peak_memory", "count_flops"]


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_calls(fn: Callable[[], object], min_seconds: float, max_calls: int = 100) -> tuple[Callable[[], None], int]:
    """``(call, n)``: ``call()`` runs ``fn`` ``n`` times, with ``n`` chosen from one trial call so that ``call`` lasts
    about ``min_seconds`` (at least 1, at most ``max_calls``); for timing calls too short to time one by one."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    n = 1 if dt <= 0 else int(min(max(math.ceil(min_seconds / dt), 1), max_calls))
    return repeated(fn, n), n


def repeated(fn: Callable[[], object], n: int) -> Callable[[], None]:
    """A callable that runs ``fn`` ``n`` times."""

    def call() -> None:
        for _ in range(n):
            fn()

    return call


def interleaved_times(
    candidates: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """Wall-clock seconds of each candidate, repetitions interleaved across the candidates.

    Args:
        candidates: ``name -> zero-argument callable``; each call is one timed unit (e.g. one train step).
        reps: timed repetitions per candidate (>= 1).
        warmup: untimed calls per candidate first (also interleaved).
        device: synchronised before and after each timed call.

    Returns:
        ``name -> {"median": s, "times": [s, ...]}``.
    """
    device = torch.device(device)
    names = list(candidates)
    for _ in range(max(int(warmup), 0)):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(max(int(reps), 1)):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            t0 = time.perf_counter()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(t), "times": t} for n, t in times.items()}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Bytes that one call of ``fn`` needs at its peak beyond what was in use before it (``None`` if unmeasurable).

    See the module docstring for how: CUDA allocator statistics, or on CPU the resident high-water mark of the
    process (Linux only; elsewhere ``None``).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return float(max(peak - base, 0) * 1024)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, forward and backward).

    Fused attention (``scaled_dot_product_attention``) is run with its math backend here, because the FLOP counter
    does not see the fused CPU kernel; its arithmetic is the same.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        fn()
    return float(counter.get_total_flops())


def optimizer_step(network: torch.nn.Module, loss: Callable, optimizer: torch.optim.Optimizer) -> Callable:
    """``step(x)``: one training step of ``network`` on a batch ``x`` reconstructed against itself."""

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(network(x), x).backward()
        optimizer.step()

    return step


def train_step_times(
    ours: Callable, reference: Callable, x: torch.Tensor, x1: torch.Tensor, reps: int, warmup: int,
    device: torch.device | str,
) -> tuple[dict, float, float]:
    """Interleaved times of two training steps on ``x`` (:func:`interleaved_times`, keys ``"ref"``/``"ours"``) and
    their FLOPs per batch, counted on the one-image batch ``x1`` and scaled: ``(times, ref_flops, our_flops)``."""
    t = interleaved_times({"ref": lambda: reference(x), "ours": lambda: ours(x)}, reps, warmup, device)
    n = x.shape[0] // max(x1.shape[0], 1)
    return t, count_flops(lambda: reference(x1)) * n, count_flops(lambda: ours(x1)) * n
