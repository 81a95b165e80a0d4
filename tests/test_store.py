"""The pool as a store: WAL readers, integrity, add/remove task, info, verify, strip (issue 3)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest
import torch

import expertpool
from expertpool.build import add_task, remove_task
from expertpool.cli import main, pool_info
from expertpool.errors import PoolCorrupt, UserError
from expertpool.nets import WRNExpert, WRNLibrary
from expertpool.store import Store, expert_name, strip

TASKS = ["alpha", "beta", "gamma", "delta"]


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "expertpool.cli", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def _hashes(path) -> dict[str, str]:
    store = Store(path, readonly=True)
    try:
        return {n: store.summary(n)["sha256"] for n in store.names()}
    finally:
        store.close()


def _assert_one_line_corrupt(path, rc, err):
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: pool {path} is corrupt: "), err


# --------------------------------------------------------------------------- WAL: readers during writes
def test_reader_reads_while_a_writer_commits(tmp_path):
    """A reader holding an open read transaction does not block the writer (WAL), keeps its snapshot,
    and sees the new components once it starts a new transaction; a reader thread opening the pool
    over and over while components are committed never fails."""
    path = tmp_path / "wal.db"
    writer = Store(path, create=True)
    writer.set_catalog({"hierarchy": None})
    lib = WRNLibrary(10, 1)
    writer.put("library", "library", lib, {"config": {"arch": "wrn_library", "depth": 10}})
    assert writer.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    reader = Store(path, readonly=True)
    reader.conn.execute("BEGIN")
    assert reader.names() == ["library"]  # snapshot taken
    errors, counts = [], []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                s = Store(path, readonly=True)
                counts.append(len(s.names()))
                s.close()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    t = threading.Thread(target=poll)
    t.start()
    for i in range(8):  # each put commits while the reader's transaction is open: no "database is locked"
        e = WRNExpert(3, lib.out_channels, 10)
        writer.put(expert_name(f"t{i}"), "expert", e, {"config": {"arch": "wrn_expert"}, "task": f"t{i}"},
                   task=f"t{i}")
    stop.set()
    t.join()
    assert reader.names() == ["library"]  # still its snapshot
    reader.conn.execute("COMMIT")
    assert len(reader.names()) == 9
    assert not errors, errors[:3]
    assert counts and counts == sorted(counts) and counts[-1] == 9
    reader.close()
    writer.close()


# --------------------------------------------------------------------------- integrity
def test_sha256_checked_on_load(tiny_pool_copy):
    con = sqlite3.connect(tiny_pool_copy)
    blob = bytearray(con.execute("SELECT weights FROM components WHERE name='expert/beta'").fetchone()[0])
    blob[-5] ^= 0xFF
    con.execute("UPDATE components SET weights=? WHERE name='expert/beta'", (bytes(blob),))
    con.commit()
    con.close()
    with pytest.raises(PoolCorrupt, match="expert/beta fails its sha256 check"):
        Store(tiny_pool_copy, readonly=True)  # a read-only open checks every blob
    store = Store(tiny_pool_copy, check=False)
    store.get("expert/alpha")
    with pytest.raises(PoolCorrupt, match="is corrupt: expert/beta fails its sha256 check"):
        store.get("expert/beta")
    assert store.verify() == ["expert/beta fails its sha256 check"]
    store.close()
    rc, _, err = _cli("pool", "verify", "--pool", str(tiny_pool_copy))
    _assert_one_line_corrupt(tiny_pool_copy, rc, err)


def test_catalog_hash_checked(tiny_pool_copy):
    con = sqlite3.connect(tiny_pool_copy)
    text = con.execute("SELECT value FROM meta WHERE key='catalog'").fetchone()[0]
    con.execute("UPDATE meta SET value=? WHERE key='catalog'", (text.replace('"alpha_0"', '"alpha_9"'),))
    con.commit()
    con.close()
    with pytest.raises(PoolCorrupt, match="catalog fails its sha256 check"):
        expertpool.open_pool(tiny_pool_copy)


def test_expert_of_another_library_is_refused(tiny_pool_copy):
    store = Store(tiny_pool_copy)
    c = store.get("expert/gamma")
    store.put("expert/gamma", "expert", c.build(), {**c.meta, "library_sha256": "0" * 64}, c.metrics, task="gamma")
    assert any("trained against library 000000000000" in p for p in store.verify())
    store.close()
    pool = expertpool.open_pool(tiny_pool_copy)
    pool.compose(["alpha", "beta"])
    with pytest.raises(UserError, match="trained against another library"):
        pool.compose(["alpha", "gamma"])


def _flip(path, offset, n=64):
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _blob_offset(path, name) -> int:
    con = sqlite3.connect(path)
    blob = con.execute("SELECT weights FROM components WHERE name=?", (name,)).fetchone()[0]
    con.close()
    return path.read_bytes().index(blob[-2000:-1000])  # the tensor bytes at its end, inside one page run


@pytest.mark.parametrize("damage", ["flip-expert", "flip-oracle", "flip-middle", "flip-header", "truncate",
                                    "foreign-sqlite", "text", "empty"])
def test_damaged_pool_gives_one_line_error_through_query(tiny_pool_copy, tmp_path, damage):
    path = tiny_pool_copy
    size = path.stat().st_size
    if damage == "flip-expert":
        _flip(path, _blob_offset(path, "expert/delta"))
    elif damage == "flip-oracle":  # a component the query does not use: still refused at open
        _flip(path, _blob_offset(path, "oracle"))
    elif damage == "flip-middle":
        _flip(path, size // 2)
    elif damage == "flip-header":
        _flip(path, 0, 100)
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 3)
    elif damage == "foreign-sqlite":
        path.unlink()
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE people (name TEXT)")
        con.commit()
        con.close()
    elif damage == "text":
        path.write_text("this is not a pool\n" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    rc, out, err = _cli("query", "--pool", str(path), "--tasks", "alpha", "beta")
    _assert_one_line_corrupt(path, rc, err)
    assert out == ""


# --------------------------------------------------------------------------- incremental pools
def test_remove_then_add_task_gives_back_the_same_expert(tiny_pool_copy, capsys):
    before = _hashes(tiny_pool_copy)
    assert main(["remove-task", "--pool", str(tiny_pool_copy), "--name", "gamma"]) == 0
    after_remove = _hashes(tiny_pool_copy)
    assert after_remove == {k: v for k, v in before.items() if k != "expert/gamma"}
    pool = expertpool.open_pool(tiny_pool_copy)
    assert pool.tasks == ["alpha", "beta", "delta"] and "gamma" not in pool.hierarchy.tasks
    pool.close()
    capsys.readouterr()

    assert main(["add-task", "--pool", str(tiny_pool_copy), "--name", "gamma", "--classes", "gamma_0", "gamma_1",
                 "8", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sha256"] == before["expert/gamma"]  # seeded by the run seed and the task's name
    assert _hashes(tiny_pool_copy) == before
    assert main(["pool", "verify", "--pool", str(tiny_pool_copy)]) == 0
    pool = expertpool.open_pool(tiny_pool_copy)
    assert sorted(pool.tasks) == sorted(TASKS)
    pool.compose(["gamma", "alpha"])


def test_add_task_errors(tiny_pool_copy, tmp_path, capsys):
    p = str(tiny_pool_copy)
    with pytest.raises(UserError, match="already has an expert"):
        add_task(p, "beta", [3, 4, 5])
    with pytest.raises(UserError, match="also in task 'alpha'"):
        add_task(p, "new", ["alpha_0"])
    with pytest.raises(UserError, match="unknown class"):
        add_task(p, "new", ["nope"])
    with pytest.raises(UserError, match="unknown task"):
        remove_task(p, "nope")
    stripped = tmp_path / "stripped.db"
    strip(tiny_pool_copy, stripped)
    assert main(["remove-task", "--pool", str(stripped), "--name", "delta"]) == 0
    capsys.readouterr()
    assert main(["add-task", "--pool", str(stripped), "--name", "delta", "--classes", "9", "10", "11"]) == 2
    assert "has no oracle weights" in capsys.readouterr().err


# --------------------------------------------------------------------------- info, verify, strip
def test_pool_info_json_lists_every_expert_with_its_hash(tiny_pool_path, capsys):
    assert main(["pool", "info", "--pool", str(tiny_pool_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    hashes = _hashes(tiny_pool_path)
    assert [e["task"] for e in info["experts"]] == TASKS
    for e in info["experts"]:
        assert set(e) >= {"task", "classes", "sha256", "params", "metrics"}
        assert e["sha256"] == hashes[expert_name(e["task"])]
        assert e["classes"] == [f"{e['task']}_{j}" for j in range(3)]
        assert e["params"] > 0 and "accuracy" in e["metrics"]
        assert e["library_sha256"] == info["library"]["sha256"]
    assert info["library"]["sha256"] == hashes["library"] and info["library"]["params"] > 0
    assert info["oracle"]["sha256"] == hashes["oracle"] and info["oracle"]["stored"] is True
    assert info["dataset"] == "synthetic" and info["tasks_without_expert"] == []
    assert main(["pool", "verify", "--pool", str(tiny_pool_path)]) == 0
    assert "6 components, all hashes ok" in capsys.readouterr().out


def test_strip_keeps_the_oracle_hash_and_answers_the_same(tiny_pool_path, tmp_path, capsys):
    out = tmp_path / "small.db"
    assert main(["pool", "strip", "--pool", str(tiny_pool_path), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"] < report["source_bytes"] / 2
    full = _hashes(tiny_pool_path)
    assert _hashes(out) == {k: v for k, v in full.items() if k != "oracle"}
    info = pool_info(str(out))
    assert info["oracle"]["sha256"] == full["oracle"] and info["oracle"]["stored"] is False
    assert main(["pool", "verify", "--pool", str(out)]) == 0
    a, b = expertpool.open_pool(tiny_pool_path), expertpool.open_pool(out)
    x = torch.randn(4, *a.input_shape)
    with torch.no_grad():
        assert torch.equal(a.compose(["beta", "delta"])(x), b.compose(["beta", "delta"])(x))
    assert main(["pool", "strip", "--pool", str(out), "--out", str(out)]) == 2


def test_missing_pool_is_a_user_error(tmp_path):
    rc, _, err = _cli("query", "--pool", str(tmp_path / "nope.db"), "--tasks", "alpha")
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_copy_of_pool_round_trips(tiny_pool_path, tmp_path):
    dst = tmp_path / "c.db"
    shutil.copy(tiny_pool_path, dst)
    assert _hashes(dst) == _hashes(tiny_pool_path)


def test_blobs_are_canonical_across_processes():
    """safetensors writes its metadata in a per-process hash order; our blobs must not depend on it."""
    code = ("import torch; from expertpool.nets import WRNExpert; from expertpool.store import serialize, sha256;"
            "torch.manual_seed(0); m = {k: k * 3 for k in 'abcdefghij'};"
            "print(sha256(serialize(WRNExpert(3, 32, 10), {'config': {'arch': 'wrn_expert'}, **m})))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(3)}
    assert len(digests) == 1
