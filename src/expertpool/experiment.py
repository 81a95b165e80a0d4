"""The paper's experiments with one command: every method on composite queries n(Q) = 1..N, the loss
ablation (cross-expert errors of experts trained with L_soft, L_scale or both), tables, plots, a summary.

    expertpool experiment --dataset fashion-mnist --preset cpu --max-queries 3 --pool runs/fm.db

Outputs (``--out``, default ``docs/results/<dataset>``): ``methods.csv``, ``cross_expert.csv``,
``queries.csv`` (every cell), ``summary.md``, ``accuracy_vs_n.png``, ``build_time.png``.
Working files (``--work``, default ``<out>/work``, not results): ``cells.jsonl`` (one line per finished
method x query: a rerun skips it), the ablation pools (library + experts, no oracle), ``calibration.json``.

The test split is used only to score finished models; nothing is selected or tuned on it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .baselines import FRONT_METHODS, METHODS, Context, build_poe, run_method, schedules, score
from .build import BuildConfig, build as build_pool, component_seed, extract_experts, log, recipe
from .calibrate import fit_calibration
from .data import load as load_data
from .errors import UserError
from .pool import Pool
from .store import Store, expert_name
from .train import Runtime, resolve_runtime

VARIANTS = {"soft": ("soft",), "scale": ("scale",), "both": ("soft", "scale")}


@dataclass
class ExperimentConfig:
    dataset: str
    preset: str = "cpu"
    methods: list[str] | None = None
    max_queries: int | None = None
    max_tasks: int = 5
    pool: str | None = None
    out: str | None = None
    work: str | None = None
    seed: int = 0
    data_root: str | None = None
    device: str = "auto"
    precision: str = "auto"
    ablation: bool = True
    progress: bool = True


# --------------------------------------------------------------------------- queries and the cell cache
def queries(tasks: list[str], max_tasks: int, max_queries: int | None, seed: int) -> list[list[str]]:
    """All combinations of 1..max_tasks tasks, or ``max_queries`` per n(Q) sampled with ``seed``."""
    out = []
    for n in range(1, min(max_tasks, len(tasks)) + 1):
        combos = [list(c) for c in itertools.combinations(tasks, n)]
        if max_queries and len(combos) > max_queries:
            pick = set(random.Random(component_seed(seed, f"queries/{n}")).sample(range(len(combos)), max_queries))
            combos = [c for i, c in enumerate(combos) if i in pick]
        out += combos
    return out


def cell_key(method: str, tasks: list[str]) -> str:
    return f"{method}|{'+'.join(tasks)}"


class Cells:
    """Finished cells, one JSON line each (appended as they finish, so several processes may share the file).

    Each cell carries a fingerprint of exactly what it used (the setup and the hashes of the pool components
    it depends on), so a cell is redone only when one of those changed: rebuilding one expert redoes only
    the cells of queries that include it, and a method that needs no pool (Scratch) can run before the
    pool is finished."""

    def __init__(self, path: Path):
        self.path = path
        self.cells: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    c = json.loads(line)
                    self.cells[c["key"]] = c
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def add(self, cell: dict) -> None:
        self.cells[cell["key"]] = cell
        with self.path.open("a") as f:
            f.write(json.dumps(cell) + "\n")


def _sha(ctx: Context, name: str) -> str:
    return ctx.pool.store.summary(name)["sha256"] if ctx.pool.store.has(name) else "missing"


def cell_fingerprint(ctx: Context, cfg: ExperimentConfig, method: str, tasks: list[str]) -> str:
    """A hash of the setup and of the pool components ``method`` uses for ``tasks``."""
    deps: dict = {"dataset": cfg.dataset, "preset": cfg.preset, "seed": cfg.seed,
                  "schedules": ctx.schedules.to_json(), "pool_seed": ctx.pool.catalog.get("seed")}
    if method not in ("scratch", "oracle"):
        deps["library"] = _sha(ctx, "library")
    if method in ("oracle", "ckd", "poe_calibrated") or method.startswith("poe["):
        deps["oracle"] = _sha(ctx, "oracle")
    if method in ("poe", "uhc", "sd"):
        deps["experts"] = [_sha(ctx, expert_name(t)) for t in tasks]
    if method == "poe_calibrated":  # the calibration is fitted on all of the pool's experts
        deps["experts"] = [_sha(ctx, expert_name(t)) for t in ctx.hierarchy.tasks]
    if method.startswith("poe["):
        deps["expert_train"] = ctx.recipe.expert_train.to_json()
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- ablation pools
def ablation_pool(ctx: Context, variant: str, work: Path, tasks: list[str]) -> Path:
    """A pool with the main pool's catalog and library, and experts trained with the variant's loss terms
    (same views, same seeds: only the loss differs). "both" is the main pool itself."""
    if variant == "both":
        return Path(ctx.pool.path)
    path = work / f"pool_{variant}.db"
    store = Store(path, create=True)
    try:
        main = ctx.pool.store
        rec = replace(ctx.recipe, loss_terms=VARIANTS[variant])
        store.set_catalog({**main.catalog, "recipe": rec.to_json(), "ablation_of": str(ctx.pool.path)})
        if not store.has("library"):
            lib = main.get("library")
            store.put("library", "library", lib.build(), lib.meta, lib.metrics)
        todo = [t for t in tasks if not store.has(expert_name(t))]
        if todo:
            log(f"ablation: extracting {len(todo)} experts with L = {' + '.join(VARIANTS[variant])}")
            views = ctx.views.for_extraction() if rec.expert_views else None
            extract_experts(store, ctx.data, ctx.hierarchy, rec, int(main.catalog.get("seed", 0)), ctx.runtime,
                            ctx.oracle, ctx.library, todo, views=views)
    finally:
        store.close()
    return path


# --------------------------------------------------------------------------- the run
def setup(cfg: ExperimentConfig) -> tuple[Context, Path, Path]:
    out = Path(cfg.out or f"docs/results/{cfg.dataset}")
    work = Path(cfg.work) if cfg.work else out / "work"
    pool_path = Path(cfg.pool) if cfg.pool else work / "pool.db"
    if not cfg.pool or not pool_path.is_file():
        if cfg.pool:
            raise UserError(f"pool {pool_path} does not exist")
        log(f"no --pool given: building (or resuming) {pool_path} with preset {cfg.preset}")
        build_pool(BuildConfig(cfg.dataset, str(pool_path), cfg.data_root, preset=cfg.preset, device=cfg.device,
                               precision=cfg.precision, seed=cfg.seed, progress=cfg.progress))
    pool = Pool(pool_path)
    cat = pool.catalog
    if cat.get("dataset") != cfg.dataset:
        raise UserError(f"pool {pool_path} is a {cat.get('dataset')} pool, not {cfg.dataset}")
    if cat.get("preset") != cfg.preset:
        raise UserError(f"pool {pool_path} was built with preset {cat.get('preset')}, not {cfg.preset}")
    rec = recipe(cfg.dataset, cfg.preset)
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.progress)
    eval_runtime = Runtime(runtime.device, False, False)
    data = load_data(cfg.dataset, cfg.data_root or cat.get("data_root"))
    ctx = Context(pool, data, rec, schedules(cfg.preset, rec), runtime, eval_runtime, cfg.seed, views_dir=str(work))
    return ctx, out, work


def check_ready(ctx: Context, methods: list[str], ablation: bool) -> None:
    """Every method needs some of the pool: say which part is missing before any work starts."""
    store = ctx.pool.store
    needs = set()
    if set(methods) - {"scratch", "oracle"} or ablation:
        needs.add("library")
    if {"oracle", "ckd", "poe_calibrated"} & set(methods) or ablation:
        needs.add("oracle")
    if {"poe", "poe_calibrated", "uhc", "sd"} & set(methods):
        needs |= {expert_name(t) for t in ctx.hierarchy.tasks}
    missing = sorted(n for n in needs if not store.has(n))
    if missing:
        raise UserError(f"pool {ctx.pool.path} lacks {', '.join(missing)} (its build is not finished); "
                        "finish the build, or run only methods that do not need them (e.g. --methods scratch "
                        "--no-ablation)")


def calibration(ctx: Context, work: Path) -> dict:
    """Fitted once per pool on unlabeled training images (the cached views); kept in ``work``."""
    path = work / "calibration.json"
    parts = ["library", "oracle", *(expert_name(t) for t in ctx.hierarchy.tasks)]
    fp = hashlib.sha256(" ".join(_sha(ctx, n) for n in parts).encode()).hexdigest()[:16]
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp:  # same library, oracle and experts
            return saved["params"]
    t0 = time.perf_counter()
    views = ctx.views
    experts = {t: ctx.pool.expert(t) for t in ctx.pool.tasks}
    params = fit_calibration(experts, {t: ctx.hierarchy.task_classes(t) for t in experts}, views.features,
                             views.oracle_logits, ctx.runtime)
    seconds = round(time.perf_counter() - t0, 2)
    log(f"calibration fitted in {seconds} s: {params}")
    path.write_text(json.dumps({"fingerprint": fp, "params": params, "fit_seconds": seconds}, indent=1))
    return params


def run(cfg: ExperimentConfig) -> dict:
    from tqdm.auto import tqdm

    methods = list(cfg.methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    started = time.perf_counter()
    ctx, out, work = setup(cfg)
    check_ready(ctx, methods, cfg.ablation)
    cells = Cells(work / "cells.jsonl")
    qs = queries(list(ctx.hierarchy.tasks), cfg.max_tasks, cfg.max_queries, cfg.seed)
    # cheap methods first, then the frozen-library heads, the ablation, and the front-training methods last
    order = [m for m in METHODS if m in methods and m not in FRONT_METHODS]
    if cfg.ablation:
        order += ["poe[soft]", "poe[scale]"]
    order += [m for m in METHODS if m in methods and m in FRONT_METHODS]
    todo = [(m, q) for m in order for q in qs if not m.startswith("poe[") or len(q) >= 2]
    fps = {(m, tuple(q)): cell_fingerprint(ctx, cfg, m, q) for m, q in todo}
    cells.cells = {k: c for k, c in cells.cells.items()  # only cells still valid for this run
                   if c.get("fp") is not None and c["fp"] == fps.get((c["method"], tuple(c["tasks"])))}
    left = [(m, q) for m, q in todo if cell_key(m, q) not in cells]
    log(f"experiment: {len(qs)} queries x {len(methods)} methods (+ ablation): {len(todo) - len(left)} cells "
        f"cached, {len(left)} to run")
    bar = tqdm(left, desc="experiment", unit="cell", disable=None if cfg.progress else True, dynamic_ncols=True)
    for method, q in bar:
        bar.set_postfix_str(cell_key(method, q))
        if method == "poe_calibrated" and ctx.calibration is None:
            ctx.calibration = calibration(ctx, work)
        if method.startswith("poe["):
            variant = method[4:-1]
            needed = sorted({t for m, qq in left if m == method for t in qq}, key=list(ctx.hierarchy.tasks).index)
            result = score(ctx, q, build_poe(ctx, q, pool_path=str(ablation_pool(ctx, variant, work, needed))))
        else:
            result = run_method(ctx, method, q)
        cells.add({"key": cell_key(method, q), "fp": fps[(method, tuple(q))], "method": method, "tasks": q,
                   "n_tasks": len(q), **result})
        log(f"{cell_key(method, q)}: accuracy {result['accuracy']:.2f} %, built in {result['build_seconds']:.3f} s")
        if (method, q) == [c for c in left if c[0] == method][-1]:  # a method finished: tables so far
            write_results(ctx, cfg, cells, methods, qs, out, work, time.perf_counter() - started)
    bar.close()
    report = write_results(ctx, cfg, cells, methods, qs, out, work, time.perf_counter() - started)
    ctx.pool.close()
    return report


# --------------------------------------------------------------------------- tables
def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs):
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def method_rows(cells: Cells, methods: list[str], qs: list[list[str]]) -> list[dict]:
    rows = []
    for m in methods:
        for n in sorted({len(q) for q in qs}):
            cs = [cells.cells[cell_key(m, q)] for q in qs if len(q) == n and cell_key(m, q) in cells]
            if not cs:
                continue
            acc = [c["accuracy"] for c in cs]
            rows.append({"method": m, "n_tasks": n, "queries": len(cs), "accuracy_mean": round(_mean(acc), 3),
                         "accuracy_std": round(_std(acc), 3),
                         "build_seconds_mean": round(_mean([c["build_seconds"] for c in cs]), 6),
                         "params": round(_mean([c["params"] for c in cs])), "flops": round(_mean([c["flops"] for c in cs]))})
    return rows


def cross_rows(cells: Cells, qs: list[list[str]], variants: dict[str, str]) -> list[dict]:
    """Cross-expert errors / all errors (%), errors pooled over the queries of each n(Q) >= 2."""
    rows = []
    for variant, method in variants.items():
        for n in sorted({len(q) for q in qs if len(q) >= 2}):
            cs = [cells.cells[cell_key(method, q)] for q in qs if len(q) == n and cell_key(method, q) in cells]
            if not cs:
                continue
            errors, cross = sum(c["errors"] for c in cs), sum(c["cross_expert_errors"] for c in cs)
            rows.append({"variant": variant, "n_tasks": n,
                         "cross_expert_ratio": round(100.0 * cross / errors, 3) if errors else 0.0,
                         "errors": errors, "cross_expert_errors": cross,
                         "accuracy_mean": round(_mean([c["accuracy"] for c in cs]), 3)})
    return rows


def _csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def write_results(ctx: Context, cfg: ExperimentConfig, cells: Cells, methods: list[str], qs: list[list[str]],
                  out: Path, work: Path, seconds: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mrows = method_rows(cells, methods, qs)
    _csv(out / "methods.csv", mrows, ["method", "n_tasks", "queries", "accuracy_mean", "accuracy_std",
                                      "build_seconds_mean", "params", "flops"])
    variants = {"soft": "poe[soft]", "scale": "poe[scale]", "both": "poe"}
    if "poe_calibrated" in methods:
        variants["both_calibrated"] = "poe_calibrated"
    crows = cross_rows(cells, qs, variants if cfg.ablation else {k: v for k, v in variants.items()
                                                                 if not v.startswith("poe[")})
    _csv(out / "cross_expert.csv", crows, ["variant", "n_tasks", "cross_expert_ratio"])
    qrows = [cells.cells[cell_key(m, q)] for m in [*methods, "poe[soft]", "poe[scale]"] for q in qs
             if cell_key(m, q) in cells]
    _csv(out / "queries.csv", [{**c, "tasks": "+".join(c["tasks"])} for c in qrows],
         ["method", "n_tasks", "tasks", "accuracy", "build_seconds", "params", "flops", "errors",
          "cross_expert_errors"])
    plots(out, mrows)
    (out / "summary.md").write_text(summary_markdown(ctx, cfg, cells, mrows, crows, qs, work, seconds))
    return {"out": str(out), "methods": mrows, "cross_expert": crows}


def plots(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    for name, key, ylabel, log_y in (("accuracy_vs_n.png", "accuracy_mean", "test accuracy (%)", False),
                                     ("build_time.png", "build_seconds_mean", "build time per query (s)", True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            rs = [r for r in rows if r["method"] == m]
            xs, ys = [r["n_tasks"] for r in rs], [max(r[key], 1e-6) for r in rs]
            if key == "accuracy_mean":
                ax.errorbar(xs, ys, yerr=[r["accuracy_std"] for r in rs], marker="o", capsize=3, label=m)
            else:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel("n(Q): primitive tasks in the composite query")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["n_tasks"] for r in rows}))
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def command_line(cfg: ExperimentConfig) -> str:
    args = ["expertpool", "experiment", "--dataset", cfg.dataset, "--preset", cfg.preset]
    if cfg.methods:
        args += ["--methods", *cfg.methods]
    for flag, v in (("--max-queries", cfg.max_queries), ("--pool", cfg.pool), ("--out", cfg.out),
                    ("--work", cfg.work), ("--data-root", cfg.data_root)):
        if v is not None:
            args += [flag, str(v)]
    if cfg.seed:
        args += ["--seed", str(cfg.seed)]
    if not cfg.ablation:
        args.append("--no-ablation")
    return shlex.join(args)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}{gpu}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")




# --------------------------------------------------------------------------- the Markdown summary
def _pivot(rows: list[dict], row_key: str, fmt) -> list[str]:
    ns = sorted({r["n_tasks"] for r in rows})
    names = list(dict.fromkeys(r[row_key] for r in rows))
    lines = [f"| {row_key} | " + " | ".join(f"n(Q)={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for name in names:
        by_n = {r["n_tasks"]: r for r in rows if r[row_key] == name}
        lines.append(f"| {name} | " + " | ".join(fmt(by_n[n]) if n in by_n else "" for n in ns) + " |")
    return lines


def checks(mrows: list[dict], crows: list[dict]) -> list[str]:
    """The issue's acceptance figures, computed from the tables (PASS / MISS per figure)."""
    acc = {(r["method"], r["n_tasks"]): r["accuracy_mean"] for r in mrows}
    secs = {(r["method"], r["n_tasks"]): r["build_seconds_mean"] for r in mrows}
    ratio = {(r["variant"], r["n_tasks"]): r["cross_expert_ratio"] for r in crows}
    ns = sorted({n for m, n in acc if m == "poe" and n >= 2})
    out = []

    def line(ok, text):
        out.append(f"- {'PASS' if ok else 'MISS'}: {text}")

    for other, limit in (("ckd", "within 2 points of CKD"), ("transfer", "not below Transfer by more than 2 points")):
        for n in ns:
            if (other, n) in acc:
                d = acc[("poe", n)] - acc[(other, n)]
                ok = abs(d) <= 2 if other == "ckd" else d >= -2
                line(ok, f"n(Q)={n}: PoE {acc[('poe', n)]:.2f} % vs {other} {acc[(other, n)]:.2f} % "
                         f"(difference {d:+.2f}; needs {limit})")
    if any(m == "poe" for m, _ in secs):
        poe_max = max(v for (m, _), v in secs.items() if m == "poe")
        line(poe_max < 1, f"PoE builds every query in under a second (slowest {poe_max:.3f} s)")
        for m in ("transfer", "ckd", "scratch", "uhc", "sd"):
            vals = [v for (mm, _), v in secs.items() if mm == m]
            if vals:
                line(min(vals) >= 10, f"{m} needs tens of seconds or more per query (fastest {min(vals):.1f} s, "
                                      f"mean {_mean(vals):.1f} s)")
    for n in sorted({n for v, n in ratio if v == "both"}):
        if ("soft", n) in ratio:
            line(ratio[("both", n)] < ratio[("soft", n)],
                 f"n(Q)={n}: cross-expert ratio both {ratio[('both', n)]:.1f} % < soft {ratio[('soft', n)]:.1f} %")
    return out


def diagnostics(cells: Cells, qs: list[list[str]], mrows: list[dict]) -> list[str]:
    """Facts that explain the figures: how much of PoE's loss is arbitration between experts, and how far
    the teacher itself (the oracle, restricted) goes."""
    out = []
    for n in sorted({len(q) for q in qs}):
        cs = [cells.cells[cell_key("poe", q)] for q in qs if len(q) == n and cell_key("poe", q) in cells]
        os_ = [cells.cells[cell_key("oracle", q)] for q in qs if len(q) == n and cell_key("oracle", q) in cells]
        if not cs:
            continue
        images = sum(c["test_images"] for c in cs)
        wrong, cross = sum(c["errors"] for c in cs), sum(c["cross_expert_errors"] for c in cs)
        text = (f"- n(Q)={n}: PoE errs on {wrong} of {images} test images ({100 * wrong / images:.2f} %), "
                f"{cross} of them cross-expert; with perfect arbitration between experts PoE would reach "
                f"{100 * (1 - (wrong - cross) / images):.2f} %")
        if os_:
            oi, ow = sum(c["test_images"] for c in os_), sum(c["errors"] for c in os_)
            oc = sum(c["cross_expert_errors"] for c in os_)
            text += (f"; the oracle restricted to Q reaches {100 * (1 - ow / oi):.2f} %, and "
                     f"{100 * oc / max(ow, 1):.1f} % of its own errors ({oc} of {ow}) also fall in another task's "
                     "classes (confusions between tasks that even the teacher makes)")
        out.append(text + ".")
    return out


def summary_markdown(ctx: Context, cfg: ExperimentConfig, cells: Cells, mrows: list[dict], crows: list[dict],
                     qs: list[list[str]], work: Path, seconds: float) -> str:
    cat = ctx.pool.catalog
    store = ctx.pool.store
    oracle_m = store.summary("oracle")["metrics"] if store.has("oracle") else {}
    library_m = store.summary("library")["metrics"] if store.has("library") else {}
    experts = {t: store.summary(expert_name(t))["metrics"].get("accuracy") for t in ctx.pool.tasks}
    rec, sch = ctx.recipe, ctx.schedules
    calib = json.loads((work / "calibration.json").read_text()) if (work / "calibration.json").is_file() else None
    done = {c["method"] for c in cells.cells.values()}
    missing = [m for m in METHODS if m not in done] + ([] if cfg.ablation else ["the loss ablation (--no-ablation)"])
    by_n: dict[int, list[str]] = {}
    for q in qs:
        by_n.setdefault(len(q), []).append("+".join(q))
    L = [f"# Pool of Experts on {cfg.dataset}: methods, build times and the loss ablation", "",
         "Generated by `expertpool experiment`; do not edit by hand.", "",
         f"- Command: `{command_line(cfg)}`",
         f"- Machine: {machine()}",
         f"- Generated: {time.strftime('%Y-%m-%d %H:%M %Z')}; this invocation ran {seconds / 60:.1f} min "
         f"(cells cached by earlier invocations are reused, see `{work}/cells.jsonl`); building the models of all "
         f"{len(cells.cells)} cells took {sum(c['build_seconds'] for c in cells.cells.values()) / 60:.1f} min "
         f"in all; load average when written: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
         "(a shared machine: build times of training methods grow with the load)",
         f"- Pool: `{ctx.pool.path}` (preset `{cat.get('preset')}`, seed {cat.get('seed')}, pool build "
         f"{cat.get('build_seconds_last_run', '?')} s in its last run)",
         f"- **Oracle accuracy** (all {len(ctx.pool.classes)} classes, test split): "
         f"**{oracle_m.get('accuracy', float('nan')):.2f} %** ({rec.oracle['arch']}-{rec.oracle.get('depth')}-"
         f"{rec.oracle.get('width')}, {oracle_m.get('params', 0):,} params, {rec.oracle_train.epochs} epochs); "
         f"library student {library_m.get('student_accuracy', float('nan')):.2f} % "
         f"({rec.student_train.epochs} epochs of KD)",
         "- Experts' accuracy on their own task: " + ", ".join(f"{t} {a:.2f} %" for t, a in experts.items()),
         *([f"- **Partial results**: not in these tables: {', '.join(missing)}"] if missing else []),
         "", "## Schedules", "",
         f"- PoE experts (in the pool): {rec.expert_train.epochs} epochs, lr {rec.expert_train.lr}, milestones "
         f"{list(rec.expert_train.milestones)}, batch {rec.expert_train.batch_size}, L_CKD with "
         f"T={rec.temperature}, alpha={rec.alpha}, on cached library features of {rec.expert_views or 'live'} "
         "augmented views of all training images (paper: 100 epochs).",
         f"- Transfer, CKD (frozen library + head of width 0.25 n(Q)): {sch.head.epochs} epochs, milestones "
         f"{list(sch.head.milestones)}, batch {sch.head.batch_size}, on the same cached features of Q's training "
         "images (paper: 100 epochs). Their build time = training + the cost of computing the library "
         "features (and, for CKD, the oracle logits) of Q's images for the views used.",
         f"- Scratch, UHC, SD (library-shaped front + head, on Q's training images): {sch.front.epochs} epochs, "
         f"milestones {list(sch.front.milestones)}, batch {sch.front.batch_size}"
         + (" (paper: 200 epochs; cut for the time budget)" if sch.front.epochs < 200 else "") + ".",
         "- Oracle: the oracle's logits restricted to Q's classes (build = slicing). PoE: cold build = open the "
         "pool file, load library + experts, consolidate.",
         "- poe_calibrated (beyond the paper, `calibrate.py`): PoE with each expert's logits mapped to "
         "a_i * s + b_i, (a_i, b_i) fitted once per pool on unlabeled training images (cached views) so that "
         "the arbitration between experts matches the oracle's task posterior; no labels, no test images."
         + (f" Fitted in {calib['fit_seconds']} s: "
            + ", ".join(f"{t} ({a:.3f}, {b:+.3f})" for t, (a, b) in calib["params"].items()) if calib else ""),
         "", "## Queries", ""]
    L += [f"- n(Q)={n} ({len(v)}): " + ", ".join(f"`{q}`" for q in v) for n, v in sorted(by_n.items())]
    L += ["", "## Test accuracy (%), mean ± std over the queries (`methods.csv`)", ""]
    L += _pivot(mrows, "method", lambda r: f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}")
    L += ["", "## Build time per query (s), params and FLOPs per image", ""]
    L += _pivot(mrows, "method", lambda r: f"{r['build_seconds_mean']:.3g} s, {r['params'] / 1e3:.1f}K, "
                                           f"{r['flops'] / 1e6:.1f} MFLOPs")
    L += ["", "## Cross-expert errors / all errors (%), pooled over each n(Q)'s queries (`cross_expert.csv`)", "",
          "Paper (CIFAR-100, Table 6), n(Q)=2..5: soft 30.8/44.8/53.5/59.6, scale 21.0/33.5/42.1/48.5, "
          "both 24.7/37.9/46.5/52.8.", ""]
    L += _pivot(crows, "variant", lambda r: f"{r['cross_expert_ratio']:.1f} ({r['cross_expert_errors']}/{r['errors']}), "
                                            f"acc {r['accuracy_mean']:.2f}")
    L += ["", "## The issue's acceptance figures", ""] + checks(mrows, crows)
    L += ["", "## Where PoE's errors come from", ""] + diagnostics(cells, qs, mrows)
    L += ["", "Plots: `accuracy_vs_n.png` (accuracy vs n(Q), error bars = std over queries), `build_time.png` "
              "(build time per query, log scale). Every cell: `queries.csv`.", ""]
    return "\n".join(L)
