"""Performance figures (``expertpool bench``): composition latency, ONNX export, fused inference, expert
extraction. Timings are measured side by side in one run; report ratios, not absolute numbers, across runs.

Without ``--pool`` the benchmark makes its own pool with the ``cpu`` preset's Fashion-MNIST architectures
and seeded random weights (timings do not depend on the weights), so it needs no trained pool. Expert
extraction is timed on Fashion-MNIST when it is installed, else on the synthetic set resized to 28x28.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from .evaluate import alternating_times, timeit_ms


@dataclass
class BenchConfig:
    quick: bool = False
    json: bool = False
    pool: str | None = None
    out: str | None = None  # also write a Markdown report here
    readme: str | None = None  # also put the goals table between the bench markers of this README


def cpu_model() -> str:
    """The CPU's model name and the vector instructions PyTorch uses on it (results differ a lot between
    them: which oneDNN kernels are fastest, whether bf16 is native)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def _random_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, so that folding them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))


def make_bench_pool(path: str) -> str:
    """A pool with the cpu preset's Fashion-MNIST library and five experts, random weights."""
    from .build import recipe
    from .hierarchy import builtin
    from .nets import create
    from .store import Store, expert_name

    rec, h = recipe("fashion-mnist", "cpu"), builtin("fashion-mnist")
    store = Store(path, create=True)
    store.set_catalog({"dataset": "fashion-mnist", "preset": "bench", "seed": 0, "hierarchy": h.to_json(),
                       "input": {"shape": [1, 28, 28], "mean": [0.286], "std": [0.353]}})
    torch.manual_seed(0)
    lib_cfg = {**rec.library, "in_channels": 1}
    library = create(lib_cfg)
    _random_bn(library, 0)
    lib_sha = store.put("library", "library", library, {"config": lib_cfg})
    for i, (task, classes) in enumerate(h.tasks.items()):
        cfg = {**rec.expert, "in_channels": library.out_channels, "num_classes": len(classes)}
        expert = create(cfg)
        _random_bn(expert, i + 1)
        store.put(expert_name(task), "expert", expert, {"config": cfg, "task": task, "classes": classes,
                                                         "class_names": [h.classes[c] for c in classes],
                                                         "library_sha256": lib_sha}, task=task)
    store.close()
    return path


def bench_compose(pool_path: str, quick: bool) -> dict:
    from .pool import Pool

    pool = Pool(pool_path)
    tasks = pool.tasks[:5]
    pool.compose(tasks)  # warm: parts loaded
    reps = 200
    warm = timeit_ms(lambda: pool.compose(tasks), repeat=reps)
    cold = timeit_ms(lambda: Pool(pool_path).compose(tasks), repeat=20 if quick else 100, warmup=2)
    return {"n_tasks": len(tasks), "compose_ms_p50": warm["p50"], "compose_ms_p99": warm["p99"],
            "compose_cold_ms_p50": cold["p50"], "compose_cold_ms_p99": cold["p99"]}


def bench_export(pool_path: str, quick: bool) -> dict:
    """ONNX artifact time (assembled from part templates and checked in ONNX Runtime), and the artifact's
    latency in ONNX Runtime (its default graph optimizations: BatchNorms folded, ReLUs fused) at batch 1,
    next to the plain PyTorch model's. (Its throughput at batch 256 is ``bench_fused``'s ONNX Runtime
    engine.)"""
    import onnxruntime as ort

    from .export import Exporter
    from .pool import Pool

    pool = Pool(pool_path)
    tasks = pool.tasks[:5]
    exporter = Exporter()
    model = pool.compose(tasks)
    blob = exporter.onnx_bytes(model, pool.input_spec)  # the first export builds the part templates
    t = timeit_ms(lambda: exporter.onnx_bytes(pool.compose(tasks), pool.input_spec), repeat=5 if quick else 20, warmup=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    x = torch.randn(1, *pool.input_shape).numpy()
    ort_ms = timeit_ms(lambda: sess.run(None, {"input": x}), repeat=200)
    with torch.no_grad():
        torch_ms = timeit_ms(lambda: model(torch.from_numpy(x)), repeat=200)
    return {"export_onnx_ms_p50": t["p50"], "export_onnx_ms_p99": t["p99"],
            "onnxruntime_batch1_ms_p50": ort_ms["p50"], "torch_batch1_ms_p50": torch_ms["p50"]}


def bench_fused(pool_path: str, quick: bool, batch: int = 256) -> dict:
    """Throughput of the plain and the fused composed model on one batch, each in its steady state.

    A serving loop calls one model again and again, so each model is timed over runs of consecutive calls
    (the first call of a run untimed); runs of the models alternate, so all see the same machine load.
    The fused model is what ``compose(..., fused=True)`` returns (its engine chosen by measurement); both
    engines are also timed on their own (``fused_torch``, ``fused_onnxruntime``), and the plain model's
    library alone: its share of the plain model's time bounds what fusing with oneDNN can gain, because
    the library's convolutions run near the CPU's peak in both models."""
    from .fuse import fuse, probe_batch
    from .pool import Pool

    pool = Pool(pool_path)
    tasks = pool.tasks[:5]
    plain, fused = pool.compose(tasks), pool.compose(tasks, fused=True)
    x = torch.randn(batch, *pool.input_shape)
    probe = probe_batch(pool.input_shape)
    choices = {k: v for k, v in fused.choices.items() if k != "engine" and v is not None}
    models = {"plain": plain, "fused": fused, "fused_torch": fuse(plain, probe, engine="torch", **choices),
              "fused_onnxruntime": fuse(plain, probe, engine="onnxruntime", **choices), "library": plain.library}
    rounds, calls = (4, 5) if quick else (8, 10)
    with torch.no_grad():
        want = plain(x)
        max_diff = max(float((want - models[k](x)).abs().max()) for k in ("fused", "fused_torch", "fused_onnxruntime"))
        times = alternating_times({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds, calls - 1)
    median = {k: statistics.median(v) for k, v in times.items()}
    out = {"fused_max_abs_diff": max_diff, "fused_choices": fused.choices, "inference_batch": batch,
           "plain_images_per_s": round(batch / median["plain"], 1)}
    for name in ("fused", "fused_torch", "fused_onnxruntime"):
        out[f"{name}_images_per_s"] = round(batch / median[name], 1)
        out[f"{name}_speedup"] = round(median["plain"] / median[name], 3)
    out["plain_library_share"] = round(median["library"] / median["plain"], 3)
    return out


def bench_extraction(quick: bool) -> dict:
    """Wall time per expert: cached + reused library/oracle outputs vs running them on every batch."""
    from .build import _view_batches, cached_views, recipe
    from .data import load
    from .distill import ckd_loss
    from .nets import create
    from .train import INFER_BATCH, fit, resolve_runtime

    try:
        data = load("fashion-mnist")
        source = "fashion-mnist"
    except Exception:
        data, source = load("synthetic"), "synthetic"
    n = 3000 if quick else 20000
    g = torch.Generator().manual_seed(0)
    train = data.train
    idx = torch.randperm(len(train), generator=g)[:n]
    from .data import Split

    train = Split(train.images[idx], train.labels[idx], train.mean, train.std, train.augment)
    rec = recipe("fashion-mnist", "cpu")
    rt = resolve_runtime("auto", "auto", progress=False)
    c = data.input_shape[0]
    torch.manual_seed(0)
    oracle = create({**rec.oracle, "in_channels": c, "num_classes": len(data.classes)}).eval()
    library = create({**rec.library, "in_channels": c}).eval()
    tc = rec.expert_train
    classes = torch.tensor([0, 6])
    k = 5  # experts sharing one cache (the Fashion-MNIST hierarchy's five tasks)

    def new_expert():
        return create({**rec.expert, "in_channels": library.out_channels, "num_classes": 2})

    # straightforward: oracle and library on every batch, one expert
    lib_d, orc_d = rt.prepare(library).eval(), rt.prepare(oracle).eval()

    def online_loss(m, b):
        with torch.no_grad():
            f, t = lib_d(b[0]), orc_d(b[0])[:, classes]
        return ckd_loss(m(f), t)

    t0 = time.perf_counter()
    fit(new_expert(), lambda e, gen: train.batches(tc.batch_size, True, True, gen, drop_last=True), online_loss, tc,
        rt, seed=1)
    online_s = time.perf_counter() - t0
    # cached + joint (what `build` does): library features and oracle logits once on the preset's views,
    # then all k experts trained together as one grouped network on them
    from .joint import ExpertGroup

    t0 = time.perf_counter()
    views = cached_views(train, rec.expert_views, 0, INFER_BATCH, [library, oracle], rt)
    views = [[f.to(torch.bfloat16) if rt.bf16 else f, t] for f, t, _ in views]
    cache_s = time.perf_counter() - t0
    tasks = [torch.tensor(c) for c in ([0, 6], [2, 4], [1, 3], [5, 7], [9, 8])][:k]
    group = ExpertGroup([new_expert() for _ in tasks])
    t0 = time.perf_counter()
    fit(group, _view_batches(views, tc.batch_size),
        lambda m, b: sum(ckd_loss(o, b[1][:, i]) for o, i in zip(m(b[0]), tasks)), tc, rt, seed=1)
    train_s = time.perf_counter() - t0
    per_expert = (cache_s + train_s) / k
    return {"extraction_data": f"{source}, {n} training images, {tc.epochs} epochs, {rec.expert_views} cached views, "
                               f"{k} experts trained jointly",
            "extraction_online_s_per_expert": round(online_s, 2), "extraction_cache_s": round(cache_s, 2),
            "extraction_joint_train_s": round(train_s, 2), "extraction_cached_s_per_expert": round(per_expert, 2),
            "extraction_speedup": round(online_s / per_expert, 2)}


def bench_fused_glibc_default(pool_path: str, quick: bool) -> dict:
    """``bench_fused`` in a fresh process whose allocator is left as glibc sets it (see ``tune_allocator``):
    the plain model's throughput depends on it far more than the fused one's."""
    code = ("import json, sys; from expertpool.bench import bench_fused; "
            "print(json.dumps(bench_fused(sys.argv[1], sys.argv[2] == '1')))")
    done = subprocess.run([sys.executable, "-c", code, pool_path, "1" if quick else "0"], capture_output=True,
                          text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"glibc_default_plain_images_per_s": r["plain_images_per_s"],
            "glibc_default_fused_images_per_s": r["fused_images_per_s"],
            "glibc_default_fused_speedup": r["fused_speedup"],
            "glibc_default_fused_torch_speedup": r["fused_torch_speedup"]}


def run(cfg: BenchConfig) -> dict:
    from .train import tune_allocator

    out = {"machine": machine(), "quick": cfg.quick, "torch_threads": torch.get_num_threads(),
           "allocator_tuned": tune_allocator()}
    with tempfile.TemporaryDirectory() as tmp:
        pool_path = cfg.pool or make_bench_pool(os.path.join(tmp, "bench.db"))
        out["pool"] = cfg.pool or "random weights, cpu preset Fashion-MNIST shapes"
        out.update(bench_compose(pool_path, cfg.quick))
        out.update(bench_fused(pool_path, cfg.quick))
        out.update(bench_fused_glibc_default(pool_path, cfg.quick))
        out.update(bench_export(pool_path, cfg.quick))
    out.update(bench_extraction(cfg.quick))
    return out


GOALS = [  # (figure, what it is, goal as text, test)
    ("compose_ms_p50", "compose n(Q) = 5 from a warm pool, p50 (ms)", "<= 1", lambda v: v <= 1),
    ("compose_cold_ms_p50", "compose n(Q) = 5 from the store, cold, p50 (ms)", "<= 20", lambda v: v <= 20),
    ("export_onnx_ms_p50", "ONNX artifact, checked in ONNX Runtime, p50 (ms)", "<= 50", lambda v: v <= 50),
    ("fused_speedup", "fused / plain throughput, batch 256, n(Q) = 5", ">= 1.5", lambda v: v >= 1.5),
    ("extraction_speedup", "wall time per expert, straightforward / cached + joint", ">= 10", lambda v: v >= 10),
]


def goals_table(result: dict) -> str:
    rows = [f"| {what} | {result[key]} | {goal} | {'met' if ok(result[key]) else '**missed**'} |"
            for key, what, goal, ok in GOALS]
    return "| figure (issue 6) | measured | goal | |\n|---|---:|---|---|\n" + "\n".join(rows) + "\n"


def markdown(result: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    return (f"# Performance\n\nGenerated by `{command}` on {result['machine']}.\n"
            "Ratios are measured side by side in one run (models timed in turns); absolute times vary with the "
            "machine's load, which on these shared 2-core machines swings by a third between minutes.\n\n"
            + goals_table(result) + "\n## Every figure\n\n| figure | value |\n|---|---|\n" + rows + "\n\n"
            "* `fused_choices`: what `fuse` measured to be faster on this CPU (stem as oneDNN convolution or "
            "patch matrix product; experts as one grouped network or fused one by one; engine: PyTorch with "
            "oneDNN post-ops, or ONNX Runtime on the composed model's graph). `fused_*` is the model "
            "`compose(..., fused=True)` returns; `fused_torch_*` and `fused_onnxruntime_*` are each engine on "
            "its own, timed in the same turns.\n"
            "* `plain_library_share`: the library's share of the plain model's time. Its convolutions run near "
            "the CPU's peak in both models, so oneDNN fusing can only win on the rest: this share bounds "
            "`fused_torch_speedup`.\n"
            "* `allocator_tuned`: the command-line tool lets glibc keep freed large buffers in the heap "
            "(`expertpool.train.tune_allocator`), which makes the plain model much faster; `glibc_default_*` "
            "is the same inference measurement in a fresh process with glibc's default allocator (as in a "
            "Python program that does not call it).\n"
            "* `onnxruntime_batch1_ms_p50` / `torch_batch1_ms_p50`: one image through the exported ONNX file "
            "(one thread) and through the plain PyTorch model.\n"
            "* `extraction_*`: the straightforward path runs the oracle and the library on every batch and "
            "trains one expert; the default path computes library features and oracle logits once on the "
            "preset's cached views and trains all experts of the hierarchy jointly; per expert = (cache + "
            "joint training) / number of experts.\n")


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def readme_block(result: dict, command: str) -> str:
    return (f"{README_START}\nGenerated by `{command}` on {result['machine']} "
            f"(every figure: [docs/results/performance.md](docs/results/performance.md)).\n\n"
            + goals_table(result) + README_END)


def check_readme(path: str) -> str:
    """The text of the README at ``path``, or a ``UserError`` if it has no bench markers."""
    from .errors import UserError

    text = open(path).read() if os.path.isfile(path) else ""
    if README_START not in text or README_END not in text:
        raise UserError(f"{path} has no {README_START} ... {README_END} markers")
    return text


def fill_readme(path: str, result: dict, command: str) -> None:
    """Replace the text between the bench markers of the README at ``path`` with the goals table."""
    head, rest = check_readme(path).split(README_START, 1)
    with open(path, "w") as f:
        f.write(head + readme_block(result, command) + rest.split(README_END, 1)[1])
