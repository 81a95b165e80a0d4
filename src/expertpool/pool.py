"""``Pool``: a built pool of experts, ready to answer composite tasks.

    pool = expertpool.open_pool("pool.db")
    pool.tasks                      # ['light_tops', 'warm_tops', ...]  (primitive tasks with an expert)
    model = pool.compose(["light_tops", "warm_tops"])
    model.labels                    # ['T-shirt/top', 'Shirt', 'Pullover', 'Coat']

Loaded networks are kept in memory, so composing from a warm pool takes microseconds; composed models
share these weights (deep-copy a model before changing its weights).
"""

from __future__ import annotations

import os

from torch import nn

from .compose import ComposedModel
from .errors import UserError
from .hierarchy import Hierarchy
from .store import Store, expert_name


class Pool:
    def __init__(self, path: str | os.PathLike, readonly: bool = True):
        self.store = Store(path, readonly=readonly)
        self.path = self.store.path
        self.catalog = self.store.catalog
        if "hierarchy" not in self.catalog:
            raise UserError(f"pool {self.path} has no catalog yet (its build has not started properly)")
        self.hierarchy = Hierarchy.from_json(self.catalog["hierarchy"])
        self._cache: dict[str, tuple[str, nn.Module, dict]] = {}

    # ------------------------------------------------------------------ what is in the pool
    @property
    def classes(self) -> list[str]:
        return self.hierarchy.classes

    @property
    def tasks(self) -> list[str]:
        """Primitive tasks that have an expert, in hierarchy order."""
        stored = {n.split("/", 1)[1] for n in self.store.names("expert")}
        return [t for t in self.hierarchy.tasks if t in stored]

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
        if name not in self._cache:
            c = self.store.get(name)
            self._cache[name] = (c.sha256, c.build(), c.meta)
        return self._cache[name]

    def library(self) -> nn.Module:
        if not self.store.has("library"):
            raise UserError(f"pool {self.path} has no library yet (its build did not get that far)")
        return self._load("library")[1]

    def library_sha256(self) -> str:
        return self._load("library")[0]

    def expert(self, task: str) -> nn.Module:
        if task not in self.hierarchy.tasks:
            raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(self.tasks)}")
        if not self.store.has(expert_name(task)):
            raise UserError(f"task {task!r} has no expert in pool {self.path} yet; valid tasks: {', '.join(self.tasks)}")
        _, module, meta = self._load(expert_name(task))
        if meta.get("library_sha256") != self.library_sha256():
            raise UserError(f"expert {task!r} was trained against another library "
                            f"({str(meta.get('library_sha256'))[:12]}), not this pool's ({self.library_sha256()[:12]})")
        return module

    # ------------------------------------------------------------------ composite tasks
    def check_query(self, tasks: list[str]) -> list[str]:
        tasks = list(tasks)
        if not tasks:
            raise UserError(f"empty query: name one or more tasks; valid tasks: {', '.join(self.tasks)}")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise UserError(f"duplicate task(s) in query: {', '.join(dup)}")
        for t in tasks:
            if t not in self.tasks:
                raise UserError(f"unknown task {t!r}; valid tasks: {', '.join(self.tasks)}")
        return tasks

    def compose(self, tasks: list[str], fused: bool = False) -> ComposedModel:
        """The composite model for ``tasks``: library + their experts, logits side by side, in eval mode.

        ``fused=True`` returns the same function as one network of grouped convolutions with BatchNorms
        folded (``fuse.FusedComposedModel``): faster inference, equal outputs up to float rounding.
        """
        tasks = self.check_query(tasks)
        experts = [self.expert(t) for t in tasks]
        ids = [c for t in tasks for c in self.hierarchy.tasks[t]]
        sizes = [len(self.hierarchy.tasks[t]) for t in tasks]
        model = ComposedModel(self.library(), experts, tasks, [self.classes[c] for c in ids], ids, sizes).eval()
        if fused:
            from .fuse import fuse

            return fuse(model)
        return model

    def close(self) -> None:
        self.store.close()


def open_pool(path: str | os.PathLike) -> Pool:
    """Open a pool file for querying."""
    return Pool(path, readonly=True)
