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
Every blob's sha256 is checked when it is read, and a read-only open checks every blob and the catalog's
own hash (``meta.catalog_sha256``) up front, so a damaged file fails at once with one line
``pool X is corrupt: ...`` (``PoolCorrupt``); nothing is unpickled. The catalog keeps the oracle's identity
and hash (``catalog["oracle"]``), so a pool stripped of its oracle blob (``strip``) still names it.

Test hook: with ``EXPERTPOOL_TEST_KILL_AFTER=<component name>`` in the environment, the process kills itself
with SIGKILL right after that component's transaction commits (to test that builds resume bit-identically).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import signal
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
        from .nets import instantiate

        return instantiate(self.config, self.tensors)


def serialize(module: torch.nn.Module, meta: dict) -> bytes:
    """safetensors bytes of a module's state dict; ``meta`` goes into the header as JSON strings.

    The bytes are canonical (a function of the tensors and ``meta`` only): the safetensors library writes
    its header's metadata in a hash-map order that changes from process to process, so the header is
    rewritten with sorted keys; this is what makes equal components have equal sha256s across runs."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return canonical(st_save(tensors, metadata={k: json.dumps(v, sort_keys=True) for k, v in meta.items()}))


def canonical(blob: bytes) -> bytes:
    """The same safetensors file with a deterministic header: metadata sorted by key, tensor entries in
    data order, compact JSON padded with spaces to a multiple of 8 bytes (as the format asks)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    if meta is not None:
        out["__metadata__"] = dict(sorted(meta.items()))
    for k in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        out[k] = header[k]
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _header(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}


class Store:
    """Low-level access to a pool file. ``Pool`` (in ``pool.py``) is the friendly object on top."""

    def __init__(self, path: str | os.PathLike, create: bool = False, readonly: bool = False,
                 check: bool | None = None):
        """Open (or with ``create`` make) a pool file. ``check`` (default: on for read-only opens) verifies
        every blob's sha256 and the catalog's hash now, so a damaged pool is refused before it is used."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"pool {self.path} does not exist (build one with `expertpool build`)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = None
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
            self._close_quietly()
            raise PoolCorrupt(f"pool {self.path} is corrupt: not a readable expertpool pool ({e})") from None
        except ValueError as e:  # e.g. a NUL in a text column
            self._close_quietly()
            raise PoolCorrupt(f"pool {self.path} is corrupt: {e}") from None
        if meta.get("format") != FORMAT:
            self._close_quietly()
            raise PoolCorrupt(f"pool {self.path} is corrupt: not an expertpool pool (no '{FORMAT}' marker)")
        try:
            version = int(meta.get("schema_version", 0))
        except ValueError:
            self._close_quietly()
            raise PoolCorrupt(f"pool {self.path} is corrupt: bad schema version {meta.get('schema_version')!r}") from None
        if version > SCHEMA_VERSION:
            self._close_quietly()
            raise UserError(f"pool {self.path} has schema {version}; this expertpool reads "
                            f"up to {SCHEMA_VERSION}: upgrade expertpool")
        self._meta = meta
        if readonly if check is None else check:
            try:
                self.check()
            except BaseException:
                self._close_quietly()
                raise

    def _close_quietly(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()

    def check(self) -> None:
        """Raise ``PoolCorrupt`` unless the catalog and every blob match their hashes (no SQLite-level scan)."""
        self.catalog  # noqa: B018  (checks the catalog's hash)
        try:
            cur = self.conn.execute("SELECT name, kind, task, sha256, weights, metrics FROM components")
            for name, kind, task, digest, blob, metrics in cur:
                self._checked_header(name, blob, digest, kind, task)
                self._json(metrics, f"metrics of {name}")
        except sqlite3.DatabaseError as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {e}") from None
        except ValueError as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {e}") from None

    def _json(self, text, what: str):
        try:
            return json.loads(text)
        except (TypeError, ValueError) as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {what} is not JSON ({e})") from None

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
        except ValueError as e:  # text that cannot be decoded
            raise PoolCorrupt(f"pool {self.path} is corrupt: {e}") from None

    @property
    def catalog(self) -> dict:
        rows = dict(self._query("SELECT key, value FROM meta WHERE key IN ('catalog', 'catalog_sha256')"))
        if "catalog" not in rows:
            return {}
        text = rows["catalog"]
        if "catalog_sha256" in rows and sha256(str(text).encode()) != rows["catalog_sha256"]:
            raise PoolCorrupt(f"pool {self.path} is corrupt: the catalog fails its sha256 check")
        catalog = self._json(text, "the catalog")
        if not isinstance(catalog, dict):
            raise PoolCorrupt(f"pool {self.path} is corrupt: the catalog is not a JSON object")
        return catalog

    def _write_catalog(self, catalog: dict) -> None:
        """Inside a transaction: replace the catalog and its hash."""
        text = json.dumps(catalog)
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('catalog', ?)", (text,))
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('catalog_sha256', ?)", (sha256(text.encode()),))
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('modified', ?)", (_now(),))

    def set_catalog(self, catalog: dict) -> None:
        with self.transaction():
            self._write_catalog(catalog)

    def update_catalog(self, **changes) -> dict:
        """Read-modify-write of the catalog in one transaction; returns the new catalog."""
        with self.transaction():
            catalog = {**self.catalog, **changes}
            self._write_catalog(catalog)
        return catalog

    def meta_value(self, key: str) -> str | None:
        return self._meta.get(key)

    # ------------------------------------------------------------------ components
    def put(self, name: str, kind: str, module: torch.nn.Module, meta: dict, metrics: dict | None = None,
            task: str | None = None, catalog: dict | None = None) -> str:
        """Store (or replace) one component in its own transaction; returns its sha256. Storing the oracle
        also records its identity and hash in the catalog (same transaction); ``catalog`` (optional)
        replaces the catalog in that transaction too."""
        blob = serialize(module, meta)
        digest = sha256(blob)
        metrics = metrics or {}
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO components VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (name, kind, task, digest, blob, json.dumps(metrics), _now()))
            if kind == "oracle" or catalog is not None:
                catalog = dict(self.catalog if catalog is None else catalog)
                if kind == "oracle":
                    catalog["oracle"] = {"sha256": digest, "config": meta.get("config"), "source": meta.get("source"),
                                         "params": metrics.get("params"), "metrics": metrics, "stored": True}
                self._write_catalog(catalog)
        if os.environ.get("EXPERTPOOL_TEST_KILL_AFTER") == name:  # test hook: die right after the commit
            os.kill(os.getpid(), signal.SIGKILL)
        return digest

    def delete(self, name: str, catalog: dict | None = None) -> None:
        """Remove a component (and, when given, replace the catalog) in one transaction."""
        with self.transaction():
            self.conn.execute("DELETE FROM components WHERE name = ?", (name,))
            if catalog is not None:
                self._write_catalog(catalog)

    def names(self, kind: str | None = None) -> list[str]:
        if kind:
            return [r[0] for r in self._query("SELECT name FROM components WHERE kind = ? ORDER BY rowid", (kind,))]
        return [r[0] for r in self._query("SELECT name FROM components ORDER BY rowid")]

    def hashes(self) -> dict[str, str]:
        """name -> sha256 of every stored component (without reading any blob)."""
        return dict(self._query("SELECT name, sha256 FROM components"))

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes when another connection commits to the file."""
        return self._query("PRAGMA data_version")[0][0]

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
                "meta": self._checked_header(name, blob, digest, kind, task),
                "metrics": self._json(metrics, f"metrics of {name}"), "created": created}

    def _checked_header(self, name: str, blob: bytes, digest: str, kind: str | None = None,
                        task: str | None = None) -> dict:
        """The blob's header metadata, after checking its hash and that the row agrees with it."""
        if not isinstance(blob, bytes) or sha256(blob) != digest:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} fails its sha256 check")
        try:
            meta = _header(blob)
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} has an unreadable header ({e})") from None
        if kind == "expert" and (meta.get("task") != task or name != expert_name(str(task))):
            raise PoolCorrupt(f"pool {self.path} is corrupt: row {name!r} (task {task!r}) does not match its "
                              f"blob's task {meta.get('task')!r}")
        if kind is not None and kind != "expert" and name != kind:
            raise PoolCorrupt(f"pool {self.path} is corrupt: row {name!r} has kind {kind!r}")
        return meta

    def get(self, name: str) -> Component:
        rows = self._query("SELECT kind, task, sha256, weights, metrics, created FROM components WHERE name = ?",
                           (name,))
        if not rows:
            raise UserError(f"pool {self.path} has no component {name!r}")
        kind, task, digest, blob, metrics, created = rows[0]
        meta = self._checked_header(name, blob, digest, kind, task)
        try:
            tensors = st_load(blob)
        except Exception as e:  # safetensors raises its own error types for malformed bytes
            raise PoolCorrupt(f"pool {self.path} is corrupt: {name} cannot be read ({e})") from None
        return Component(name, kind, task, digest, meta, tensors, self._json(metrics, f"metrics of {name}"), created)

    def verify(self) -> list[str]:
        """Check the SQLite structure, the catalog's hash, every blob's hash and header, and that every
        expert was trained against the stored library; returns the problems found (empty: all good)."""
        problems = [f"sqlite: {r[0]}" for r in self._query("PRAGMA integrity_check") if r[0] != "ok"]
        try:
            self.catalog  # noqa: B018
        except PoolCorrupt as e:
            problems.append(str(e).split(": ", 1)[-1])
        library, experts = None, {}
        for (name,) in self._query("SELECT name FROM components ORDER BY rowid"):
            try:
                s = self.summary(name)
            except PoolCorrupt as e:
                problems.append(str(e).split(" is corrupt: ", 1)[-1])
                continue
            if s["kind"] == "library":
                library = s["sha256"]
            elif s["kind"] == "expert":
                experts[name] = s["meta"].get("library_sha256")
        for name, lib in experts.items():
            if lib != library:
                problems.append(f"{name} was trained against library {str(lib)[:12]}, not the stored "
                                f"library {str(library)[:12]}")
        return problems

    def close(self) -> None:
        self.conn.close()


def strip(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write a copy of pool ``src`` without the oracle's weights (the catalog keeps its identity and hash),
    VACUUMed and in rollback-journal mode, for shipping a small pool. Returns sizes and the oracle's hash."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError("--out must be another file than --pool")
    store = Store(src, readonly=True)
    try:
        oracle = store.summary("oracle") if store.has("oracle") else None
        catalog = store.catalog
        if out.exists():
            out.unlink()
        for suffix in ("-wal", "-shm"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        dst = sqlite3.connect(out, isolation_level=None)
        try:
            store.conn.backup(dst)
        except sqlite3.DatabaseError as e:
            dst.close()
            out.unlink(missing_ok=True)
            raise PoolCorrupt(f"pool {src} is corrupt: {e}") from None
        finally:
            store.close()
        dst.close()
    except BaseException:
        with contextlib.suppress(Exception):
            store.close()
        raise
    copy = Store(out, check=False)
    if oracle is not None:
        entry = {"sha256": oracle["sha256"], "config": oracle["meta"].get("config"),
                 "source": oracle["meta"].get("source"), "params": oracle["metrics"].get("params"),
                 "metrics": oracle["metrics"]}
        copy.delete("oracle", {**catalog, "oracle": {**catalog.get("oracle", {}), **entry, "stored": False}})
    copy.conn.execute("PRAGMA journal_mode=DELETE")
    copy.conn.execute("VACUUM")
    copy.close()
    return {"pool": str(out), "bytes": out.stat().st_size, "source_bytes": src.stat().st_size,
            "oracle_sha256": oracle["sha256"] if oracle else (catalog.get("oracle") or {}).get("sha256")}
