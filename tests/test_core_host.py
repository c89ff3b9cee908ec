"""Scoring's host half: reductions moved to numpy without copies, and numpy's BLAS held to torch's threads."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from layerguard.core.host import host, match_blas_threads


def test_host_converts_tensors_in_tuples_and_keeps_everything_else():
    t = torch.arange(6.0).reshape(2, 3)
    mean, norm, positions = host((t, t * 2, 16))
    assert isinstance(mean, np.ndarray) and np.shares_memory(mean, t.numpy())  # a CPU tensor is not copied
    assert norm.tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]] and positions == 16
    assert host(None) is None
    grad = torch.ones(2, requires_grad=True) * 3
    assert host(grad).tolist() == [3.0, 3.0]


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_threads_follow_torch_threads():
    if not _blas_threads():
        pytest.skip("numpy loaded no BLAS threadpoolctl can see")
    before, threads = torch.get_num_threads(), _blas_threads()
    with threadpool_limits(limits=threads[0], user_api="blas"):  # restored afterwards, whatever the test does
        torch.set_num_threads(1)
        try:
            assert match_blas_threads() == 1
            assert set(_blas_threads()) == {1}
        finally:
            torch.set_num_threads(before)


def test_without_threadpoolctl_the_limit_is_skipped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails as if not installed
    assert match_blas_threads(1) is None
    assert "could not limit numpy's BLAS threads" in caplog.text
