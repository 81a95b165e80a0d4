"""A build killed with SIGKILL right after its first expert is stored, then resumed, equals an
uninterrupted build bit for bit; a reader with its own connection keeps reading the pool all along."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch

from expertpool.errors import PoolCorrupt
from expertpool.pool import open_pool
from expertpool.store import Store

BUILD = ["build", "--dataset", "synthetic", "--preset", "tiny", "--no-progress"]


def _build(pool, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "expertpool.cli", *BUILD, "--pool", str(pool)],
                          capture_output=True, text=True, env=env, timeout=1800)


class Reader(threading.Thread):
    """Opens the pool read-only (every blob's hash checked) over and over while a build writes it."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.stop, self.seen, self.errors = path, threading.Event(), [], []

    def run(self):
        while not self.stop.is_set():
            if self.path.exists():
                try:
                    store = Store(self.path, readonly=True)
                    try:
                        self.seen.append(tuple(store.names()))
                    finally:
                        store.close()
                except PoolCorrupt as e:  # only before the writer has made the schema
                    if self.seen:
                        self.errors.append(str(e))
            time.sleep(0.2)


def _hashes(path) -> dict[str, str]:
    store = Store(path, readonly=True)
    try:
        return {n: store.summary(n)["sha256"] for n in store.names()}
    finally:
        store.close()


def test_killed_build_resumes_bit_identical_while_a_reader_reads(tiny_pool_path, tmp_path):
    pool = tmp_path / "resumed.db"
    reader = Reader(pool)
    reader.start()
    try:
        killed = _build(pool, {"EXPERTPOOL_TEST_KILL_AFTER": "expert/alpha"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert list(_hashes(pool)) == ["oracle", "library", "expert/alpha"]  # nothing finished was lost
        resumed = _build(pool)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "oracle: found in pool" in resumed.stderr and "library: found in pool" in resumed.stderr
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    # the reader read all along, with no error once the schema existed, and saw the pool grow
    assert not reader.errors, reader.errors[:3]
    assert reader.seen and len(reader.seen[-1]) == 6
    assert any(0 < len(s) < 6 for s in reader.seen)
    assert all(len(a) <= len(b) for a, b in zip(reader.seen, reader.seen[1:]))

    # bit-identical to the uninterrupted build (made in-process by the session fixture)
    assert _hashes(pool) == _hashes(tiny_pool_path)
    a, b = open_pool(pool), open_pool(tiny_pool_path)
    x = torch.randn(16, *a.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a.compose(a.tasks)(x), b.compose(b.tasks)(x)
    assert torch.equal(la, lb)
    a.close()
    b.close()
