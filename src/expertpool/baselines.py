"""The paper's baselines: every one builds a model for a composite query Q (a list of primitive tasks).

* ``oracle``    the big model, logits restricted (by index) to Q's classes: the upper reference, huge.
* ``poe``       Pool of Experts: library + Q's experts, logits side by side; no training.
* ``poe_calibrated`` PoE with each expert's logits affinely calibrated (``calibrate.py``); no training.
* ``transfer``  frozen library + a new head trained with cross-entropy on Q's images.
* ``ckd``       frozen library + a new head trained with L_CKD from the oracle restricted to Q.
* ``scratch``   a library-shaped front + head trained from labels on Q's images.
* ``uhc``       front + head trained on Q's images to match each expert on its slice of the logits.
* ``sd``        like UHC, each expert's softened output zero-padded to all of Q's classes.

Every trained model has a head of width 0.25 * n(Q) (a ``WRNExpert`` with ``width = 0.25 * n``: 16 * n
channels), so its size matches PoE's. All training goes through ``train.fit``. The frozen-library
methods (Transfer, CKD) reuse the library features and oracle logits cached once on fixed augmented views of
the training set (``FeatureViews``), exactly as the pool's own experts are trained; their build time is the
training time plus their share of that cache (the cost of computing the features of Q's images alone).

A method returns a ``Built``: the model, the wall seconds it took to build it for Q, and its test logits.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .build import Recipe, cached_views, component_seed
from .data import ImageData
from .distill import ckd_loss, sd_loss, uhc_loss
from .evaluate import count_flops, count_params, cross_expert_ratio, logits_on
from .hierarchy import Hierarchy
from .nets import Classifier, create
from .pool import Pool
from .train import INFER_BATCH, Runtime, TrainConfig, fit, predict

HEAD_METHODS = ("transfer", "ckd")  # frozen library + head, on cached features
FRONT_METHODS = ("scratch", "uhc", "sd")  # library-shaped front + head, on images
FREE_METHODS = ("oracle", "poe", "poe_calibrated")  # no training at query time
METHODS = ("oracle", "poe", "poe_calibrated", "transfer", "ckd", "scratch", "uhc", "sd")


# --------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedules:
    """Training schedules of the baselines for one preset."""

    head: TrainConfig  # Transfer, CKD: the same as the pool's experts (paper: 100 epochs)
    front: TrainConfig  # Scratch, UHC, SD (paper: 200 epochs)

    def to_json(self) -> dict:
        return {"head": self.head.to_json(), "front": self.front.to_json()}


def schedules(preset: str, rec: Recipe) -> Schedules:
    """``paper``: the paper's epochs (heads 100, fronts 200). ``cpu``: heads as the cpu pool's experts
    (10 epochs on cached features); fronts only 2 epochs instead of 200: each epoch of a front on Q's
    Fashion-MNIST images costs about as much as 10 epochs of a head, and the whole run (2 queries per n(Q),
    every method, the ablation pools) has to fit well under an hour on 2 shared cores.
    ``tiny``: the tiny recipe's schedules (tests)."""
    if preset == "paper":
        return Schedules(rec.expert_train, TrainConfig(200, 0.1, (80, 160)))
    if preset == "cpu":
        return Schedules(rec.expert_train, TrainConfig(2, 0.1, (1,), batch_size=256))
    return Schedules(rec.expert_train, rec.student_train)


# --------------------------------------------------------------------------- shared, computed once
@dataclass
class FeatureViews:
    """Library features and oracle logits on fixed augmented views of the training set (no labels needed
    except by the label-using baselines), plus the seconds per image each took to compute."""

    features: list[torch.Tensor]
    oracle_logits: list[torch.Tensor]
    labels: torch.Tensor
    library_s_per_image: float
    oracle_s_per_image: float

    @classmethod
    def compute(cls, data: ImageData, library: nn.Module, oracle: nn.Module, views: int, seed: int,
                runtime: Runtime) -> "FeatureViews":
        """Same views (same seed) as ``build.extract_experts`` uses for the pool's experts."""
        n = len(data.train) * views
        t0 = time.perf_counter()
        lib = cached_views(data.train, views, seed, INFER_BATCH, [library], runtime)
        for v in lib:  # bf16 features halve the memory (as the pool's own expert training does)
            v[0] = v[0].to(torch.bfloat16) if runtime.bf16 else v[0]
        t1 = time.perf_counter()
        ora = cached_views(data.train, views, seed, INFER_BATCH, [oracle], runtime)
        t2 = time.perf_counter()
        return cls([v[0] for v in lib], [v[0] for v in ora], lib[0][1], (t1 - t0) / n, (t2 - t1) / n)

    def for_extraction(self) -> list[list[torch.Tensor]]:
        """The ``views`` argument of ``build.extract_experts``."""
        return [[f, t] for f, t in zip(self.features, self.oracle_logits)]


@dataclass
class Context:
    """Everything the methods share for one pool: data, networks, runtimes, cached features."""

    pool: Pool
    data: ImageData
    recipe: Recipe
    schedules: Schedules
    runtime: Runtime  # training
    eval_runtime: Runtime  # test evaluation (fp32)
    seed: int = 0
    calibration: dict | None = None  # task -> (scale, bias), see calibrate.py
    views_dir: str | None = None  # where to keep the cached views on disk (shared by runs and processes)
    _views: FeatureViews | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def hierarchy(self) -> Hierarchy:
        return self.pool.hierarchy

    @property
    def library(self) -> nn.Module:
        return self.pool.library()

    @property
    def oracle(self) -> nn.Module:
        if "oracle" not in self._cache:
            self._cache["oracle"] = self.pool.store.get("oracle").build()
        return self._cache["oracle"]

    @property
    def views(self) -> FeatureViews:
        if self._views is None:
            views, seed = max(1, self.recipe.expert_views or 2), int(self.pool.catalog.get("seed", 0))
            path = None
            if self.views_dir:
                key = f"{self.pool.library_sha256()}/{self.pool.store.summary('oracle')['sha256']}/{views}/{seed}"
                path = os.path.join(self.views_dir, f"views-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
                if os.path.isfile(path):
                    self._views = FeatureViews(**torch.load(path, weights_only=True))
                    return self._views
            self._views = FeatureViews.compute(self.data, self.library, self.oracle, views, seed, self.runtime)
            if path:
                torch.save(vars(self._views), path + ".tmp")
                os.replace(path + ".tmp", path)
        return self._views

    def test_features(self) -> torch.Tensor:
        if "test_features" not in self._cache:
            self._cache["test_features"] = predict(self.library, (x for x, _ in self.data.test.batches(INFER_BATCH)),
                                                   self.eval_runtime)
        return self._cache["test_features"]

    def oracle_test_logits(self) -> torch.Tensor:
        if "oracle_test" not in self._cache:
            self._cache["oracle_test"] = logits_on(self.oracle, self.data.test, self.eval_runtime)
        return self._cache["oracle_test"]

    def class_ids(self, tasks: list[str]) -> list[int]:
        return [c for t in tasks for c in self.hierarchy.task_classes(t)]

    def group_sizes(self, tasks: list[str]) -> list[int]:
        return [len(self.hierarchy.task_classes(t)) for t in tasks]

    def test_rows(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the test split in Q's classes and their labels relabelled to Q's output order."""
        return _rows(self.data.test.labels, self.class_ids(tasks))


def _rows(labels: torch.Tensor, class_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lut = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(class_ids)] = torch.arange(len(class_ids))
    rel = lut[labels]
    rows = (rel >= 0).nonzero().flatten()
    return rows, rel[rows]


# --------------------------------------------------------------------------- results
@dataclass
class Built:
    model: nn.Module  # maps images to Q's logits (Q's classes side by side, in query order)
    seconds: float  # wall seconds to build it for Q
    logits: Callable[[], torch.Tensor]  # its logits on Q's test images (rows of Context.test_rows)
    extra: dict = field(default_factory=dict)


def score(ctx: Context, tasks: list[str], built: Built) -> dict:
    """Accuracy (%), cross-expert errors, params and FLOPs of a built model on Q's test images."""
    _, labels = ctx.test_rows(tasks)
    logits = built.logits()
    cross = cross_expert_ratio(logits, labels, ctx.group_sizes(tasks))
    model = built.model.cpu().float()
    return {"accuracy": round(100.0 * (logits.argmax(1) == labels).float().mean().item(), 3),
            "build_seconds": round(built.seconds, 6), "params": count_params(model),
            "flops": count_flops(model, ctx.data.input_shape), "test_images": len(labels), **cross, **built.extra}


# --------------------------------------------------------------------------- model pieces
class RestrictedOracle(nn.Module):
    """The oracle with its logits restricted (by index) to a composite task's classes."""

    def __init__(self, oracle: nn.Module, class_ids: list[int]):
        super().__init__()
        self.oracle = oracle
        self.register_buffer("index", torch.tensor(class_ids), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.oracle(x)[:, self.index]


def head_for(ctx: Context, tasks: list[str], in_channels: int) -> nn.Module:
    """A head of width 0.25 * n(Q) (16 * n(Q) channels) on Q's classes."""
    rec = ctx.recipe.expert
    config = {**rec, "width": rec.get("width", 0.25) * len(tasks), "in_channels": in_channels,
              "num_classes": len(ctx.class_ids(tasks))}
    return create(config)


def front_for(ctx: Context) -> nn.Module:
    """A fresh network shaped like the pool's library."""
    return create({**ctx.recipe.library, "in_channels": ctx.data.input_shape[0]})


def _seed(ctx: Context, method: str, tasks: list[str]) -> int:
    s = component_seed(ctx.seed, f"{method}/{'+'.join(tasks)}")
    torch.manual_seed(s)
    return s


def _feature_batches(tensors: list[list[torch.Tensor]], rows: torch.Tensor, batch_size: int):
    """A ``batches`` function for ``fit``: the given rows of cached views, one view per epoch, shuffled."""
    def batches(epoch: int, g: torch.Generator):
        view = tensors[epoch % len(tensors)]
        order = rows[torch.randperm(len(rows), generator=g)]
        stop = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield tuple(t[idx] for t in view)
    return batches


def _steps(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


# --------------------------------------------------------------------------- train-free methods
def build_oracle(ctx: Context, tasks: list[str]) -> Built:
    oracle = ctx.oracle
    t0 = time.perf_counter()
    model = RestrictedOracle(oracle, ctx.class_ids(tasks))
    seconds = time.perf_counter() - t0
    rows, _ = ctx.test_rows(tasks)
    return Built(model, seconds, lambda: ctx.oracle_test_logits()[rows][:, ctx.class_ids(tasks)])


def build_poe(ctx: Context, tasks: list[str], calibrated: bool = False, pool_path: str | None = None) -> Built:
    """Compose from the pool file, cold (open the file, load library + experts, consolidate): timed."""
    from .calibrate import CalibratedModel

    t0 = time.perf_counter()
    pool = Pool(pool_path or ctx.pool.path)
    model = pool.compose(tasks)
    if calibrated:
        if ctx.calibration is None:
            raise ValueError("poe_calibrated needs a fitted calibration (calibrate.fit_calibration)")
        model = CalibratedModel(model, [ctx.calibration[t] for t in tasks])
    seconds = time.perf_counter() - t0
    pool.close()
    rows, _ = ctx.test_rows(tasks)
    images = ctx.data.test.subset(ctx.class_ids(tasks))
    return Built(model, seconds, lambda: logits_on(model, images, ctx.eval_runtime),
                 {"compose_ms": round(seconds * 1000, 3)})


# --------------------------------------------------------------------------- frozen library + head
def _train_head(ctx: Context, tasks: list[str], method: str, loss_kind: str) -> Built:
    views = ctx.views  # computed once, shared by every query (not timed here; its share is added below)
    class_ids = ctx.class_ids(tasks)
    rows, rel = _rows(views.labels, class_ids)
    relabel = torch.full_like(views.labels, -1)
    relabel[rows] = rel
    idx = torch.tensor(class_ids)
    tc, T, alpha = ctx.schedules.head, ctx.recipe.temperature, ctx.recipe.alpha
    t0 = time.perf_counter()
    seed = _seed(ctx, method, tasks)
    head = head_for(ctx, tasks, ctx.library.out_channels)
    if loss_kind == "ce":
        tensors = [[f, relabel] for f in views.features]

        def loss(m, b):
            return nn.functional.cross_entropy(m(b[0]), b[1])
    else:
        tensors = [[f, t[:, idx]] for f, t in zip(views.features, views.oracle_logits)]

        def loss(m, b):
            return ckd_loss(m(b[0]), b[1], T, alpha)
    stats = fit(head, _feature_batches(tensors, rows, tc.batch_size), loss, tc, ctx.runtime, seed,
                f"{method} {'+'.join(tasks)}", _steps(len(rows), tc.batch_size))
    train_s = time.perf_counter() - t0
    per_image = views.library_s_per_image + (views.oracle_s_per_image if loss_kind == "ckd" else 0.0)
    share = per_image * len(rows) * min(len(views.features), tc.epochs)
    model = Classifier(ctx.library, head.cpu().eval())
    test_rows, _ = ctx.test_rows(tasks)
    return Built(model, train_s + share,
                 lambda: predict(head, ctx.test_features()[test_rows].split(INFER_BATCH), ctx.eval_runtime),
                 {"train_seconds": round(train_s, 3), "feature_seconds": round(share, 3),
                  "epochs": stats["epochs"], "train_images": len(rows)})


def build_transfer(ctx: Context, tasks: list[str]) -> Built:
    return _train_head(ctx, tasks, "transfer", "ce")


def build_ckd(ctx: Context, tasks: list[str]) -> Built:
    return _train_head(ctx, tasks, "ckd", "ckd")


# --------------------------------------------------------------------------- front + head from scratch
def _train_front(ctx: Context, tasks: list[str], method: str) -> Built:
    class_ids = ctx.class_ids(tasks)
    train = ctx.data.train.subset(class_ids)
    tc, T = ctx.schedules.front, ctx.recipe.temperature
    t0 = time.perf_counter()
    seed = _seed(ctx, method, tasks)
    front = front_for(ctx)
    model = Classifier(front, head_for(ctx, tasks, front.out_channels))
    if method == "scratch":
        def loss(m, b):
            return nn.functional.cross_entropy(m(b[0]), b[1])
    else:
        teacher = ctx.runtime.prepare(ctx.pool.compose(tasks)).eval()  # the experts, side by side
        sizes = ctx.group_sizes(tasks)
        distill = uhc_loss if method == "uhc" else sd_loss

        def loss(m, b):
            with torch.no_grad():
                teachers = list(teacher(b[0]).float().split(sizes, dim=1))
            return distill(m(b[0]), teachers, T)
    stats = fit(model, lambda e, g: train.batches(tc.batch_size, True, True, g, drop_last=True), loss, tc,
                ctx.runtime, seed, f"{method} {'+'.join(tasks)}", train.num_batches(tc.batch_size, True))
    seconds = time.perf_counter() - t0
    model = model.cpu().eval()
    images = ctx.data.test.subset(class_ids)
    return Built(model, seconds, lambda: logits_on(model, images, ctx.eval_runtime),
                 {"train_seconds": round(seconds, 3), "epochs": stats["epochs"], "train_images": len(train)})


def build_scratch(ctx: Context, tasks: list[str]) -> Built:
    return _train_front(ctx, tasks, "scratch")


def build_uhc(ctx: Context, tasks: list[str]) -> Built:
    return _train_front(ctx, tasks, "uhc")


def build_sd(ctx: Context, tasks: list[str]) -> Built:
    return _train_front(ctx, tasks, "sd")


BUILDERS: dict[str, Callable[[Context, list[str]], Built]] = {
    "oracle": build_oracle,
    "poe": build_poe,
    "poe_calibrated": lambda ctx, tasks: build_poe(ctx, tasks, calibrated=True),
    "transfer": build_transfer,
    "ckd": build_ckd,
    "scratch": build_scratch,
    "uhc": build_uhc,
    "sd": build_sd,
}


def run_method(ctx: Context, method: str, tasks: list[str]) -> dict:
    """Build ``method``'s model for the composite task ``tasks`` and score it on Q's test images."""
    if method not in BUILDERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return score(ctx, tasks, BUILDERS[method](ctx, tasks))
