"""``Pool``: a built pool of experts, ready to answer composite tasks.

    pool = expertpool.open_pool("pool.db")
    pool.tasks                      # ['light_tops', 'warm_tops', ...]  (primitive tasks with an expert)
    model = pool.compose(["light_tops", "warm_tops"])
    model.labels                    # ['T-shirt/top', 'Shirt', 'Pullover', 'Coat']

Loaded networks are kept in memory, so composing from a warm pool takes microseconds; composed models
share these weights (deep-copy a model before changing its weights).
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch
from torch import nn

from .compose import ComposedModel
from .errors import UserError
from .hierarchy import Hierarchy
from .store import Store, expert_name


class Pool:
    def __init__(self, path: str | os.PathLike, readonly: bool = True):
        self.store = Store(path, readonly=readonly)
        self.path = self.store.path
        self._cache: dict[str, tuple[str, nn.Module, dict]] = {}  # name -> (sha256, module, metadata)
        self._data_version: int | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Read the catalog and the stored tasks again if another connection has committed since (an
        ``add-task`` or ``remove-task`` while a service runs); SQLite's ``data_version`` says when, for the
        price of one pragma, so this runs before every query. Cached parts whose hash changed are dropped."""
        version = self.store.data_version()
        if version == self._data_version:
            return
        catalog = self.store.catalog
        if "hierarchy" not in catalog:
            raise UserError(f"pool {self.path} has no catalog yet (its build has not started properly)")
        hashes = self.store.hashes()
        self.catalog, self.hierarchy = catalog, Hierarchy.from_json(catalog["hierarchy"])
        self._cache = {n: entry for n, entry in self._cache.items() if hashes.get(n) == entry[0]}
        self._tasks = [t for t in self.hierarchy.tasks if expert_name(t) in hashes]
        self._has_library = "library" in hashes
        self._data_version = version

    # ------------------------------------------------------------------ what is in the pool
    @property
    def classes(self) -> list[str]:
        return self.hierarchy.classes

    @property
    def tasks(self) -> list[str]:
        """Primitive tasks that have an expert, in hierarchy order."""
        self._refresh()
        return list(self._tasks)

    def task_classes(self, task: str) -> list[str]:
        return [self.classes[c] for c in self.hierarchy.task_classes(task)]

    def describe_tasks(self) -> list[dict]:
        return [{"name": t, "classes": self.task_classes(t)} for t in self.tasks]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.catalog["input"]["shape"])  # type: ignore[return-value]

    @property
    def input_spec(self) -> dict:
        return dict(self.catalog["input"])

    # ------------------------------------------------------------------ loading parts
    def _load(self, name: str) -> tuple[str, nn.Module, dict]:
        """A stored network (hash, module in eval mode, metadata), loaded once and then kept in memory."""
        if name not in self._cache:
            with _gc_paused():
                c = self.store.get(name)
                self._cache[name] = (c.sha256, c.build(), c.meta)
        entry = self._cache[name]
        if entry[1].training:  # a caller put a composed model, so these shared parts, in training mode
            entry[1].eval()
        return entry

    def library(self) -> nn.Module:
        self._refresh()
        return self._library()[1]

    def library_sha256(self) -> str:
        self._refresh()
        return self._library()[0]

    def expert(self, task: str) -> nn.Module:
        self._refresh()
        return self._expert(task)[1]

    def expert_sha256(self, task: str) -> str:
        self._refresh()
        return self._expert(task)[0]

    def _library(self) -> tuple[str, nn.Module, dict]:
        if not self._has_library:
            raise UserError(f"pool {self.path} has no library yet (its build did not get that far)")
        return self._load("library")

    def _expert(self, task: str) -> tuple[str, nn.Module, dict]:
        if task not in self._tasks:
            if task in self.hierarchy.tasks:
                raise UserError(f"task {task!r} has no expert in pool {self.path} yet; "
                                f"valid tasks: {', '.join(self._tasks)}")
            raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(self._tasks)}")
        entry = self._load(expert_name(task))
        library_sha = self._library()[0]
        if entry[2].get("library_sha256") != library_sha:
            raise UserError(f"expert {task!r} was trained against another library "
                            f"({str(entry[2].get('library_sha256'))[:12]}), not this pool's ({library_sha[:12]})")
        return entry

    # ------------------------------------------------------------------ composite tasks
    def check_query(self, tasks: list[str]) -> list[str]:
        """The query as a list, or a ``UserError`` for an empty query, a duplicate or an unknown task."""
        self._refresh()
        tasks, valid = list(tasks), self._tasks
        if not tasks:
            raise UserError(f"empty query: name one or more tasks; valid tasks: {', '.join(valid)}")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise UserError(f"duplicate task(s) in query: {', '.join(dup)}")
        for t in tasks:
            if t not in valid:
                raise UserError(f"unknown task {t!r}; valid tasks: {', '.join(valid)}")
        return tasks

    def compose(self, tasks: list[str], fused: bool = False) -> ComposedModel:
        """The composite model for ``tasks``: library + their experts, logits side by side, in eval mode.

        ``fused=True`` returns the same function rewritten for fast inference (``fuse.FusedComposedModel``:
        BatchNorms folded, channels-last, ReLUs and additions inside the convolutions, experts grouped or
        not, run by PyTorch or by ONNX Runtime, whichever is faster on this machine): outputs within 1e-5
        of the plain model's; a second or two to make, since it times its candidates once (more the first
        time in a process, when the ONNX part templates are exported).
        """
        tasks = self.check_query(tasks)
        experts = [self._expert(t)[1] for t in tasks]
        ids = [c for t in tasks for c in self.hierarchy.tasks[t]]
        sizes = [len(self.hierarchy.tasks[t]) for t in tasks]
        model = ComposedModel(self._library()[1], experts, tasks, [self.classes[c] for c in ids], ids, sizes)
        model.training = model.experts.training = False  # the parts are in eval mode already (``_load``),
        # so the composed model is put in eval mode without a walk over all its submodules
        if fused:
            from .fuse import fuse, probe_batch

            return fuse(model, probe=probe_batch(self.input_shape))
        return model

    def close(self) -> None:
        self.store.close()


@contextlib.contextmanager
def _gc_paused():
    """Building a network makes thousands of small objects, and the collections they trigger walk the
    ~200,000 objects that importing torch leaves alive: a third of a cold compose's time, and most of its
    spread. The collector is paused for the few milliseconds a part takes to load (if it was on)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def open_pool(path: str | os.PathLike) -> Pool:
    """Open a pool file for querying."""
    return Pool(path, readonly=True)
