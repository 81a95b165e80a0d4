"""Shared fixtures: one tiny synthetic pool, built once per test session through the real CLI."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from expertpool.cli import main

# One intra-op thread for everything this test process trains or runs: results that tests compare bit for
# bit (a task removed and added back, a rebuilt component) must come from the same thread count, and the
# service under test also runs PyTorch with one thread. Subprocesses (CLI runs) inherit the same setting, so
# a pool built by a subprocess equals one built in this process, bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pool_path(tmp_path_factory):
    """Path of a pool built with ``expertpool build --dataset synthetic --preset tiny`` (read-only use)."""
    path = tmp_path_factory.mktemp("pool") / "tiny.db"
    assert main(["build", "--dataset", "synthetic", "--preset", "tiny", "--pool", str(path), "--no-progress"]) == 0
    return path


@pytest.fixture
def tiny_pool_copy(tiny_pool_path, tmp_path):
    """A private copy of the tiny pool that a test may change."""
    dst = tmp_path / "copy.db"
    shutil.copy(tiny_pool_path, dst)
    return dst
