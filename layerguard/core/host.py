"""Scoring's second half runs on the host in numpy: moving a reduction there, and keeping numpy's BLAS in step.

Why numpy: after a rule's `reduce` (torch, on the model's device, over whole activations) what is left is a
few hundred numbers per input, and the cost of scoring them is the number of ops, not their arithmetic. A numpy
op on such small arrays costs a fraction of a torch op's dispatch, and more so just after a forward pass, when
both run with cold caches (measured by bench/guard_profile.py and bench/overhead.py; docs/benchmarks.md).

Why the thread limit: numpy's OpenBLAS starts one thread per core by default (unless OPENBLAS_NUM_THREADS or
OMP_NUM_THREADS say otherwise), so the precision products of a large batch would spread over every core while
torch keeps to the threads the worker was given. A worker's CPU budget is its torch thread count; numpy's BLAS
should stay within it. threadpoolctl (scikit-learn's) sets the limit for whichever BLAS numpy loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

__all__ = ["host", "last_axis_dots", "last_axis_sums", "match_blas_threads"]

logger = logging.getLogger(__name__)


def host(value: Any) -> Any:
    """A reduction (a tensor, a tuple of tensors and counts, or None) with its tensors as numpy arrays on the host,
    where rules compute terms and scores. No copy for a CPU tensor."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            value = value.detach()
        return (value if value.device.type == "cpu" else value.cpu()).numpy()
    if isinstance(value, tuple):
        return tuple(host(v) for v in value)
    return value


def last_axis_sums(a: np.ndarray) -> np.ndarray:
    """[..., N] -> [...] float32 sums over the last axis, as one matrix-vector product: numpy's own `sum` over a
    short last axis runs about 5x slower (ResNet-20's [96, 32, 256] kept maps: 168 us against 33 us, one core)."""
    rows = a.reshape(-1, a.shape[-1])
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    return (rows @ np.ones(a.shape[-1], dtype=np.float32)).reshape(a.shape[:-1])


def last_axis_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., N] . [..., N] -> [...] dot products over the last axis, as batched 1 x N by N x 1 products: about 2x
    faster than einsum on these shapes (and `b` may be `a`, for squared norms)."""
    return (a[..., None, :] @ b[..., :, None])[..., 0, 0]


def match_blas_threads(threads: int | None = None) -> int | None:
    """Limit numpy's BLAS to `threads` (default: torch's intra-op thread count) for this process; returns the
    limit, or None when it could not be set (threadpoolctl missing or no BLAS found: scoring still works, only
    its CPU use may exceed the worker's share)."""
    threads = threads or torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
    except Exception as exc:  # noqa: BLE001 - a missing limit costs CPU, never a prediction
        logger.warning("layerguard: could not limit numpy's BLAS threads to %d: %s", threads, exc)
        return None
    return threads
