"""Batch-parallel inference on CPU: one slice of the batch per thread, each on one intra-op thread.

PyTorch parallelises an operator over its elements. A model built from many medium-sized element-wise operators
and small batched matmuls (the SSD layers) gains little from that: on 2 cores, TiM4Rec's inference step at L = 200
ran only 1.2-1.35x faster with 2 intra-op threads than with 1, while SASRec's large attention and feed-forward
kernels ran 1.7x faster. Running independent slices of the batch side by side, each single-threaded, keeps every
core busy through the whole step (operators release the GIL): measured 17% faster for TiM4Rec at L = 200 and
50, batch 256, 2 cores (benchmarks/README.md).

Used only where it is exact and safe: inference (no autograd, no autocast), CPU tensors, more than one intra-op
thread, and at least `MIN_TOKENS` positions per slice. The result equals the one-call result (each row is
computed independently). The intra-op thread count is set to 1 while the slices run and restored after, so this
must not run concurrently with other torch work in the same process (an inference step never does).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from tim4rec_pl.inference.kernels import autocast_on

MIN_TOKENS = 8192  # batch rows x window length per slice below which one call is cheaper

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="tim4rec")
        return _pool


def slices(batch: int, length: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges to run side by side: one per intra-op thread, or a single range when that would not pay."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or torch.is_grad_enabled() or autocast_on(device):
        return [(0, batch)]
    parts = min(threads, batch, batch * length // MIN_TOKENS)
    if parts < 2:
        return [(0, batch)]
    bounds = [round(i * batch / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_sliced(fn: Callable[..., Tensor], ranges: list[tuple[int, int]], *tensors: Tensor) -> Tensor:
    """fn(*(t[a:b] for t in tensors)) for each (a, b), side by side, concatenated along dim 0."""
    if len(ranges) == 1:
        return fn(*tensors)
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def work(a: int, b: int) -> Tensor:
        torch.set_num_threads(1)  # this thread's intra-op team (grad mode and threads are per thread)
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(*(t[a:b] for t in tensors))

    try:
        futures = [_executor().submit(work, a, b) for a, b in ranges[1:]]
        first = work(*ranges[0])  # the calling thread takes the first slice
        return torch.cat([first, *(f.result() for f in futures)])
    finally:
        torch.set_num_threads(threads)
