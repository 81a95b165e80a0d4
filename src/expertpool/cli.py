"""The ``expertpool`` command: each sub-command maps its flags to a dataclass and calls one plain function.

Bad input (unknown task, empty query, missing data, corrupt pool, ...) prints one line ``error: ...`` and
exits with status 2; an interrupted build exits 130 and keeps every finished component.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from .errors import UserError
from .train import tune_allocator


# --------------------------------------------------------------------------- commands
def cmd_build(cfg) -> int:
    from .build import build

    report = build(cfg)
    print(json.dumps(report, indent=2))
    return 0


@dataclass
class TasksConfig:
    pool: str
    json: bool = False


def cmd_tasks(cfg: TasksConfig) -> int:
    from .pool import open_pool

    pool = open_pool(cfg.pool)
    tasks = pool.describe_tasks()
    if cfg.json:
        print(json.dumps({"tasks": tasks}))
    else:
        for t in tasks:
            print(f"{t['name']}: {', '.join(t['classes'])}")
    return 0


@dataclass
class QueryConfig:
    pool: str
    tasks: list[str]
    eval: bool = False
    json: bool = False
    data_root: str | None = None
    device: str = "auto"
    export: str | None = None


def query(cfg: QueryConfig) -> dict:
    """Compose the model for ``cfg.tasks``; optionally evaluate and export it. Returns the JSON answer."""
    from .evaluate import count_flops, count_params
    from .pool import open_pool

    pool = open_pool(cfg.pool)
    t0 = time.perf_counter()
    model = pool.compose(cfg.tasks)
    build_ms = (time.perf_counter() - t0) * 1000
    answer = {"tasks": model.tasks, "labels": model.labels, "label_groups": model.label_groups,
              "params": count_params(model), "flops": count_flops(model, pool.input_shape),
              "build_ms": round(build_ms, 3), "accuracy": None}
    if cfg.eval:
        answer["accuracy"] = evaluate_composed(pool, model, cfg.data_root, cfg.device)
    if cfg.export:
        from .export import export

        answer["export"] = export(model, cfg.export, pool.input_spec)
    return answer


def evaluate_composed(pool, model, data_root: str | None = None, device: str = "auto") -> float:
    """Accuracy (%) of a composed model on the test images of the union of its classes."""
    from .data import load as load_data
    from .evaluate import accuracy
    from .train import resolve_runtime

    cat = pool.catalog
    size = cat["input"]["shape"][-1] if cat["dataset"] in ("imagefolder", "imagenet") else None
    data = load_data(cat["dataset"], data_root or cat.get("data_root"), image_size=size)
    return accuracy(model, data.test.subset(model.class_ids), resolve_runtime(device, "fp32", progress=False))


def cmd_query(cfg: QueryConfig) -> int:
    answer = query(cfg)
    if cfg.json:
        print(json.dumps(answer))
    else:
        print(f"composite task: {' + '.join(answer['tasks'])}")
        print(f"labels ({len(answer['labels'])}): {', '.join(answer['labels'])}")
        print(f"params {answer['params']:,}  FLOPs {answer['flops']:,}  built in {answer['build_ms']:.2f} ms")
        if answer["accuracy"] is not None:
            print(f"accuracy on the test images of these classes: {answer['accuracy']:.2f} %")
        if "export" in answer:
            print(f"exported to {answer['export']['path']}")
    return 0


@dataclass
class PoolInfoConfig:
    pool: str
    json: bool = False


def pool_info(path: str) -> dict:
    """The ``pool info --json`` answer: ``{"library": {...} or null, "experts": [{"task", "classes", "sha256",
    "params", "metrics", ...}], "oracle": {...} or null, ...}`` (a stripped pool's oracle comes from the
    catalog, with ``"stored": false``)."""
    from .store import Store

    store = Store(path, readonly=True)
    try:
        cat = store.catalog
        hierarchy = cat.get("hierarchy") or {}
        info = {"pool": str(store.path), "format": store.meta_value("format"),
                "schema_version": int(store.meta_value("schema_version") or 0),
                "created": store.meta_value("created"), "modified": store.meta_value("modified"),
                "dataset": cat.get("dataset"), "preset": cat.get("preset"), "seed": cat.get("seed"),
                "precision": cat.get("precision"), "software_version": cat.get("software_version"),
                "input": cat.get("input"), "hierarchy": hierarchy.get("name"),
                "oracle": None, "library": None, "experts": []}
        for name in store.names():
            s = store.summary(name)
            entry = {"sha256": s["sha256"], "bytes": s["bytes"], "params": s["metrics"].get("params"),
                     "metrics": s["metrics"], "created": s["created"], "config": s["meta"].get("config")}
            if s["kind"] == "expert":
                info["experts"].append({"task": s["task"], "classes": s["meta"].get("class_names"),
                                        "class_ids": s["meta"].get("classes"),
                                        "library_sha256": s["meta"].get("library_sha256"), **entry})
            else:
                info[s["kind"]] = {**entry, "stored": True} if s["kind"] == "oracle" else entry
        if info["oracle"] is None and cat.get("oracle"):
            info["oracle"] = {**cat["oracle"], "stored": False}
        have = {e["task"] for e in info["experts"]}
        info["tasks_without_expert"] = [t for t in hierarchy.get("tasks", {}) if t not in have]
        return info
    finally:
        store.close()


def cmd_pool_info(cfg: PoolInfoConfig) -> int:
    info = pool_info(cfg.pool)
    if cfg.json:
        print(json.dumps(info))
        return 0
    print(f"pool {info['pool']} ({info['dataset']}, preset {info['preset']}, seed {info['seed']})")
    for kind in ("oracle", "library"):
        c = info[kind]
        if c:
            where = "" if c.get("stored", True) else "  (not stored: stripped)"
            print(f"  {kind:8s} {c['sha256'][:12]}  {c.get('params') or 0:>10,} params  {c.get('metrics')}{where}")
        else:
            print(f"  {kind:8s} none")
    for e in info["experts"]:
        print(f"  expert   {e['sha256'][:12]}  {e['params'] or 0:>10,} params  {e['task']}: "
              f"accuracy {e['metrics'].get('accuracy')} %")
    if info["tasks_without_expert"]:
        print(f"  tasks without an expert: {', '.join(info['tasks_without_expert'])}")
    return 0


@dataclass
class PoolVerifyConfig:
    pool: str


def cmd_pool_verify(cfg: PoolVerifyConfig) -> int:
    """Check the SQLite structure, the catalog's hash, every blob's hash and every expert's library hash."""
    from .errors import PoolCorrupt
    from .store import Store

    store = Store(cfg.pool, readonly=True, check=False)
    try:
        problems = store.verify()
        n = len(store.names())
    finally:
        store.close()
    if problems:
        raise PoolCorrupt(f"pool {cfg.pool} is corrupt: {'; '.join(problems)}")
    print(f"pool {cfg.pool}: {n} components, all hashes ok")
    return 0


# --------------------------------------------------------------------------- argument parsing
# Sub-commands of other modules (each ``add_commands(sub)`` registers parsers with ``set_defaults(run=...,
# config=SomeDataclass)``); they import their heavy dependencies inside their command functions.
EXTENSIONS = ("cli_store", "cli_service", "cli_experiment", "cli_bench")


def _parser() -> argparse.ArgumentParser:
    import importlib

    from . import __version__
    from .build import PRESETS, BuildConfig
    from .data import DATASETS

    p = argparse.ArgumentParser(prog="expertpool", description="Pool of Experts: train-free composite models.")
    p.add_argument("--version", action="version", version=f"expertpool {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build (or resume) a pool: oracle -> library -> experts")
    b.set_defaults(run=cmd_build, config=BuildConfig)
    b.add_argument("--dataset", required=True, choices=DATASETS)
    b.add_argument("--pool", required=True, help="pool file to create or resume")
    b.add_argument("--data-root")
    b.add_argument("--hierarchy", help="built-in name or JSON/YAML file of primitive tasks")
    b.add_argument("--preset", default="cpu", choices=PRESETS)
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    b.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--oracle", help="state-dict file of a trained oracle (the recipe's architecture)")
    b.add_argument("--image-size", type=int, help="resize ImageFolder images to N x N")
    b.add_argument("--library-weights", help="pretrained MobileNetV2 state-dict file (the imagenet library)")
    b.add_argument("--no-progress", dest="progress", action="store_false")

    t = sub.add_parser("tasks", help="list the pool's primitive tasks")
    t.set_defaults(run=cmd_tasks, config=TasksConfig)
    t.add_argument("--pool", required=True)
    t.add_argument("--json", action="store_true")

    q = sub.add_parser("query", help="compose the model of a composite task")
    q.set_defaults(run=cmd_query, config=QueryConfig)
    q.add_argument("--pool", required=True)
    q.add_argument("--tasks", nargs="*", required=True, metavar="TASK")
    q.add_argument("--eval", action="store_true", help="accuracy on the test images of the queried classes")
    q.add_argument("--json", action="store_true")
    q.add_argument("--data-root")
    q.add_argument("--device", default="auto")
    q.add_argument("--export", metavar="FILE", help="write the model to FILE (.onnx, .safetensors or .pt2)")

    pool = sub.add_parser("pool", help="inspect a pool").add_subparsers(dest="pool_command", required=True)
    pi = pool.add_parser("info", help="catalog and components")
    pi.set_defaults(run=cmd_pool_info, config=PoolInfoConfig)
    pi.add_argument("--pool", required=True)
    pi.add_argument("--json", action="store_true")
    pv = pool.add_parser("verify", help="check every component's sha256 and the file's structure")
    pv.set_defaults(run=cmd_pool_verify, config=PoolVerifyConfig)
    pv.add_argument("--pool", required=True)

    for name in EXTENSIONS:
        importlib.import_module(f".{name}", __package__).add_commands(sub, pool)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_allocator()
    kw = {k: v for k, v in vars(args).items() if k not in ("command", "pool_command", "run", "config")}
    try:
        return args.run(args.config(**kw))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; every finished component is kept in the pool", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; EXPERTPOOL_DEBUG=1 shows it
        if os.environ.get("EXPERTPOOL_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "run again with EXPERTPOOL_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
