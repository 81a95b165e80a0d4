"""The pool store: one SQLite file holding a catalog and every component's weights.

Tables::

    meta(key, value)                 format marker, schema version, software version, creation time,
                                     and the catalog (JSON: data set, hierarchy, preset, hyperparameters,
                                     input spec, oracle identity)
    components(name, kind, task, sha256, weights, metrics, created)
                                     one row per oracle / library / expert; ``weights`` are safetensors
                                     bytes whose header metadata carries the component's config, classes,
                                     library hash and hyperparameters; ``metrics`` (JSON) holds what was
                                     measured (accuracy, seconds), kept out of the blob so that two builds
                                     with the same seed give byte-identical blobs.

Each component is written in its own transaction (WAL mode: readers keep reading while a build writes).
Every blob's sha256 is checked when it is read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save as st_save

from .errors import PoolCorrupt, UserError

FORMAT = "expertpool-pool"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS components (
    name    TEXT PRIMARY KEY,
    kind    TEXT NOT NULL CHECK (kind IN ('oracle', 'library', 'expert')),
    task    TEXT,
    sha256  TEXT NOT NULL,
    weights BLOB NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL
);
"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def expert_name(task: str) -> str:
    return f"expert/{task}"


@dataclass
class Component:
    """A stored network: its config and metadata (from the safetensors header) and its tensors."""

    name: str
    kind: str
    task: str | None
    sha256: str
    meta: dict  # config, classes, library_sha256, hyperparameters, ...
    tensors: dict[str, torch.Tensor]
    metrics: dict
    created: str

    @property
    def config(self) -> dict:
        return self.meta["config"]

    def build(self) -> torch.nn.Module:
        """The network with its weights loaded, in eval mode."""
        from .nets import create

        net = create(self.config)
        net.load_state_dict(self.tensors)
        return net.eval()


def serialize(module: torch.nn.Module, meta: dict) -> bytes:
    """safetensors bytes of a module's state dict; ``meta`` goes into the header as JSON strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return st_save(tensors, metadata={k: json.dumps(v, sort_keys=True) for k, v in meta.items()})


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _header(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}


class Store:
    """Low-level access to a pool file. ``Pool`` (in ``pool.py``) is the friendly object on top."""

    def __init__(self, path: str | os.PathLike, create: bool = False, readonly: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"pool {self.path} does not exist (build one with `expertpool build`)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
            self.conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False, isolation_level=None)
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
            if create:
                self.conn.executescript(SCHEMA)
                with self.transaction():
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (_now(),))
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt or not a pool: {e}") from None
        if meta.get("format") != FORMAT:
            raise PoolCorrupt(f"pool {self.path} is not an expertpool pool (no '{FORMAT}' marker)")
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise UserError(f"pool {self.path} has schema {meta['schema_version']}; this expertpool reads "
                            f"up to {SCHEMA_VERSION}: upgrade expertpool")
        self._meta = meta

    # ------------------------------------------------------------------ transactions and the catalog
    @contextlib.contextmanager
    def transaction(self):
        """One write transaction; taken with BEGIN IMMEDIATE so concurrent writers wait instead of failing."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {e}") from None

    @property
    def catalog(self) -> dict:
        rows = self._query("SELECT value FROM meta WHERE key = 'catalog'")
        if not rows:
            return {}
        try:
            return json.loads(rows[0][0])
        except json.JSONDecodeError as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: catalog is not JSON ({e})") from None

    def set_catalog(self, catalog: dict) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('catalog', ?)", (json.dumps(catalog),))
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('modified', ?)", (_now(),))

    def meta_value(self, key: str) -> str | None:
        return self._meta.get(key)

    # ------------------------------------------------------------------ components
    def put(self, name: str, kind: str, module: torch.nn.Module, meta: dict, metrics: dict | None = None,
            task: str | None = None) -> str:
        """Store (or replace) one component in its own transaction; returns its sha256."""
        blob = serialize(module, meta)
        digest = sha256(blob)
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO components VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (name, kind, task, digest, blob, json.dumps(metrics or {}), _now()))
        return digest

    def delete(self, name: str) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM components WHERE name = ?", (name,))

    def names(self, kind: str | None = None) -> list[str]:
        if kind:
            return [r[0] for r in self._query("SELECT name FROM components WHERE kind = ? ORDER BY rowid", (kind,))]
        return [r[0] for r in self._query("SELECT name FROM components ORDER BY rowid")]

    def has(self, name: str) -> bool:
        return bool(self._query("SELECT 1 FROM components WHERE name = ?", (name,)))

    def summary(self, name: str) -> dict:
        """Hash, metadata and metrics of a component, without loading its tensors into torch."""
        rows = self._query("SELECT kind, task, sha256, metrics, created, weights FROM components WHERE name = ?",
                           (name,))
        if not rows:
            raise UserError(f"pool {self.path} has no component {name!r}")
        kind, task, digest, metrics, created, blob = rows[0]
        return {"name": name, "kind": kind, "task": task, "sha256": digest, "bytes": len(blob),
                "meta": self._checked_header(name, blob, digest), "metrics": json.loads(metrics),
                "created": created}

    def _checked_header(self, name: str, blob: bytes, digest: str) -> dict:
        if sha256(blob) != digest:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} fails its sha256 check")
        try:
            return _header(blob)
        except (ValueError, UnicodeDecodeError) as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} has an unreadable header ({e})") from None

    def get(self, name: str) -> Component:
        rows = self._query("SELECT kind, task, sha256, weights, metrics, created FROM components WHERE name = ?",
                           (name,))
        if not rows:
            raise UserError(f"pool {self.path} has no component {name!r}")
        kind, task, digest, blob, metrics, created = rows[0]
        meta = self._checked_header(name, blob, digest)
        try:
            tensors = st_load(blob)
        except Exception as e:  # safetensors raises its own error types for malformed bytes
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} cannot be read ({e})") from None
        return Component(name, kind, task, digest, meta, tensors, json.loads(metrics), created)

    def verify(self) -> list[str]:
        """Check every blob's hash and the SQLite structure; returns the problems found."""
        problems = [r[0] for r in self._query("PRAGMA integrity_check") if r[0] != "ok"]
        for name, digest, blob in self._query("SELECT name, sha256, weights FROM components"):
            if sha256(blob) != digest:
                problems.append(f"{name}: sha256 mismatch")
        return problems

    def close(self) -> None:
        self.conn.close()
