"""Is the fast expert extraction as accurate as the straightforward one?  (issue 6, item 1)

Trains every expert of a built pool twice, from the pool's own oracle, library, recipe and seed:

* **default** (what ``expertpool build`` does): library features and oracle logits computed once on the
  recipe's fixed augmented views, all experts trained together as one grouped network;
* **straightforward**: one expert at a time, the oracle and the library run on every freshly augmented batch.

Same initial weights, same schedule and loss. Writes per-task test accuracy and wall time per expert to
``OUT.json`` and a Markdown table to ``OUT.md``. The pool is not modified (the default path runs on a copy).

    python scripts/extraction_accuracy.py --pool runs/fm.db --out docs/results/fashion-mnist/extraction

The pool needs its oracle (a full pool, not one made with ``expertpool pool strip``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time

import torch

from expertpool.build import (_net, _seeded, component_seed, extract_experts, log, recipe_from_json,
                              task_accuracy)
from expertpool.bench import machine
from expertpool.data import load as load_data
from expertpool.distill import ckd_loss
from expertpool.hierarchy import Hierarchy
from expertpool.store import Store, expert_name
from expertpool.train import INFER_BATCH, fit, predict, resolve_runtime, tune_allocator


def straightforward(pool: str, tasks: list[str] | None) -> dict:
    store = Store(pool, readonly=True)
    cat = store.catalog
    hierarchy, rec, seed = Hierarchy.from_json(cat["hierarchy"]), recipe_from_json(cat["recipe"]), cat["seed"]
    data = load_data(cat["dataset"], cat.get("data_root"))
    runtime = resolve_runtime("auto", cat.get("precision", "auto"), progress=True)
    oracle, library = store.get("oracle").build(), store.get("library").build()
    store.close()
    frozen = [runtime.prepare(library).eval(), runtime.prepare(oracle).eval()]
    test_features = predict(library, (x for x, _ in data.test.batches(INFER_BATCH)), runtime)
    tc, out = rec.expert_train, {}
    for task in tasks or list(hierarchy.tasks):
        classes = hierarchy.tasks[task]
        idx = torch.tensor(classes)
        _seeded(seed, expert_name(task))  # the same initial weights as the default path
        _, expert = _net(rec.expert, data, len(classes), in_channels=library.out_channels)

        def loss(m, b):
            with torch.no_grad():
                f, t = frozen[0](b[0]), frozen[1](b[0])[:, idx]
            return ckd_loss(m(f), t, rec.temperature, rec.alpha, "soft" in rec.loss_terms, "scale" in rec.loss_terms)

        t0 = time.perf_counter()
        fit(expert, lambda e, g: data.train.batches(tc.batch_size, True, True, g, drop_last=True), loss, tc, runtime,
            component_seed(seed, "experts/" + task), f"straightforward {task}", data.train.num_batches(tc.batch_size, True))
        seconds = time.perf_counter() - t0
        out[task] = {"accuracy": task_accuracy(expert, test_features, data.test, classes, runtime),
                     "seconds": round(seconds, 1)}
        log(f"straightforward {task}: {out[task]}")
    return out


def default(pool: str, tasks: list[str] | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "pool.db")
        Store(pool, readonly=True).close()  # refuses a damaged or foreign file
        with sqlite3.connect(pool) as src, sqlite3.connect(copy) as dst:  # a consistent copy, WAL included
            src.backup(dst)
        store = Store(copy)
        cat = store.catalog
        hierarchy, rec, seed = Hierarchy.from_json(cat["hierarchy"]), recipe_from_json(cat["recipe"]), cat["seed"]
        tasks = tasks or list(hierarchy.tasks)
        for task in hierarchy.tasks:
            if store.has(expert_name(task)):
                store.delete(expert_name(task))
        data = load_data(cat["dataset"], cat.get("data_root"))
        runtime = resolve_runtime("auto", cat.get("precision", "auto"), progress=True)
        oracle, library = store.get("oracle").build(), store.get("library").build()
        t0 = time.perf_counter()
        extract_experts(store, data, hierarchy, rec, seed, runtime, oracle, library, list(hierarchy.tasks))
        seconds = time.perf_counter() - t0
        out = {t: {"accuracy": store.summary(expert_name(t))["metrics"]["accuracy"]} for t in tasks}
        store.close()
    return {"tasks": out, "seconds_total": round(seconds, 1),
            "seconds_per_expert": round(seconds / len(hierarchy.tasks), 1)}


def markdown(r: dict, command: str) -> str:
    rows = []
    for task, s in r["straightforward"].items():
        d = r["default"]["tasks"][task]["accuracy"]
        rows.append(f"| {task} | {s['accuracy']:.2f} | {d:.2f} | {d - s['accuracy']:+.2f} |")
    s_per = sum(s["seconds"] for s in r["straightforward"].values()) / len(r["straightforward"])
    return (f"# Expert extraction: default (cached views + joint) vs straightforward\n\n"
            f"Generated by `{command}` on {r['machine']}.\n"
            f"Pool: {r['pool']} ({r['dataset']}, preset {r['preset']}); test accuracy on each task's own classes.\n\n"
            "| task | straightforward % | default % | difference (points) |\n|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\nLargest drop: {r['largest_drop']:.2f} points (goal: at most 0.5). "
            f"Wall time per expert: straightforward {s_per:.1f} s, default {r['default']['seconds_per_expert']:.1f} s "
            f"(cache + joint training of all {len(r['default']['tasks'])} experts, divided by their number): "
            f"{s_per / r['default']['seconds_per_expert']:.1f}x.\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True, help="path without extension: OUT.json and OUT.md are written")
    p.add_argument("--tasks", nargs="*", help="only these tasks (default: all)")
    a = p.parse_args()
    tune_allocator()
    cat = Store(a.pool, readonly=True).catalog
    r = {"machine": machine(), "pool": a.pool, "dataset": cat["dataset"], "preset": cat.get("preset"),
         "torch_threads": torch.get_num_threads()}
    r["default"] = default(a.pool, a.tasks)
    r["straightforward"] = straightforward(a.pool, a.tasks)
    r["largest_drop"] = max(s["accuracy"] - r["default"]["tasks"][t]["accuracy"] for t, s in r["straightforward"].items())
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(r, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(r, "python " + " ".join(sys.argv)))
    print(json.dumps({"largest_drop": r["largest_drop"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
