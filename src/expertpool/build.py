"""Preprocessing: oracle -> library -> experts, each stored in the pool as soon as it is trained.

1. **oracle**: trained from scratch on all classes (or loaded from a checkpoint / torchvision model).
2. **library**: a student (library + head on all classes) is distilled from the oracle with plain KD; only
   its front, the library, is kept.
3. **experts**: for every primitive task, a head trained with L_CKD on top of the frozen library, on ALL
   training images, against the oracle's logits restricted to the task's classes.

A build is resumable: a stage whose component is already in the pool is loaded, not redone, and every
component is seeded from the run seed and its own name, so a resumed build equals an uninterrupted one.
The library and the oracle are frozen while experts train, so (with ``expert_views > 0``) their outputs
are computed once on a fixed set of augmented views and reused by every expert.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from . import __version__
from .data import ImageData, Split, load as load_data
from .distill import ckd_loss, soft_loss
from .errors import UserError
from .evaluate import accuracy, count_params
from .hierarchy import Hierarchy, resolve as resolve_hierarchy
from .joint import ExpertGroup
from .nets import Classifier, WRNExpert, create
from .store import Store, expert_name
from .train import INFER_BATCH, Runtime, TrainConfig, fit, predict, resolve_runtime


# --------------------------------------------------------------------------- recipes (presets)
@dataclass(frozen=True)
class Recipe:
    """Architectures and schedules of one build. Net configs omit in_channels / num_classes (filled in)."""

    oracle: dict
    library: dict
    expert: dict
    oracle_train: TrainConfig
    student_train: TrainConfig
    expert_train: TrainConfig
    temperature: float = 4.0
    alpha: float = 0.3
    student_views: int = 0  # 0: oracle run on every student batch; k: its logits cached on k augmented views
    expert_views: int = 0  # 0: library + oracle run on every expert batch; k: cached on k augmented views
    loss_terms: tuple[str, ...] = ("soft", "scale")  # L_CKD terms (the ablation drops one)

    def to_json(self) -> dict:
        return asdict(self)


PAPER_SCHEDULES = dict(
    oracle_train=TrainConfig(200, 0.1, (60, 120, 160), 0.2),
    student_train=TrainConfig(200, 0.1, (80, 160)),
    expert_train=TrainConfig(100, 0.1, (40, 80)),
)


def recipe(dataset: str, preset: str) -> Recipe:
    """The recipe for a data set and preset (``paper``, ``cpu`` or ``tiny``)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    wrn_lib, wrn_exp = {"arch": "wrn_library", "depth": 16, "width": 1}, {"arch": "wrn_expert", "depth": 16, "width": 0.25}
    if dataset == "tinyimagenet":
        oracle = {"arch": "wrn", "depth": 16, "width": 10, "first_stride": 2}
        lib, exp = {**wrn_lib, "width": 2, "first_stride": 2}, wrn_exp
    elif dataset == "imagenet":  # pretrained oracle (--oracle) and library (--library-weights); experts streamed
        expert_train = TrainConfig(1, 0.01, (), batch_size=32) if preset == "tiny" else TrainConfig(20, 0.01, (10, 15))
        return Recipe({"arch": "torchvision", "name": "resnet50"}, {"arch": "mobilenet_v2_library"},
                      {"arch": "mobilenet_v2_expert"}, oracle_train=TrainConfig(0), student_train=TrainConfig(0),
                      expert_train=expert_train)
    else:
        oracle, lib, exp = {"arch": "wrn", "depth": 40, "width": 4}, wrn_lib, wrn_exp
    if preset == "paper":
        return Recipe(oracle, lib, exp, **PAPER_SCHEDULES)
    if preset == "cpu":  # Fashion-MNIST pool in well under 30 minutes on 2 cores
        return Recipe({**oracle, "depth": 16, "width": 4}, lib, exp,
                      oracle_train=TrainConfig(4, 0.1, (2, 3), batch_size=128),
                      student_train=TrainConfig(8, 0.1, (4, 6), batch_size=256),
                      expert_train=TrainConfig(10, 0.1, (4, 8), batch_size=256),
                      student_views=4, expert_views=2)
    # tiny: the synthetic pool in seconds, for tests
    return Recipe({"arch": "wrn", "depth": 10, "width": 2}, {**wrn_lib, "depth": 10},
                  {**wrn_exp, "depth": 10},
                  oracle_train=TrainConfig(8, 0.05, (6,), batch_size=128),
                  student_train=TrainConfig(8, 0.05, (6,), batch_size=128),
                  expert_train=TrainConfig(8, 0.05, (6,), batch_size=128),
                  student_views=2, expert_views=2)


PRESETS = ["tiny", "cpu", "paper"]


@dataclass
class BuildConfig:
    dataset: str
    pool: str
    data_root: str | None = None
    hierarchy: str | None = None
    preset: str = "cpu"
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    oracle: str | None = None  # a state-dict file for the recipe's oracle (safetensors or torch.save)
    image_size: int | None = None
    progress: bool = True
    library_weights: str | None = None  # a pretrained MobileNetV2 state dict (the imagenet recipe's library)
    loss_terms: tuple[str, ...] = ("soft", "scale")
    extra: dict = field(default_factory=dict)


def component_seed(seed: int, name: str) -> int:
    """A seed of its own for every component, from the run seed and the component's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "little")


def log(msg: str) -> None:
    print(f"[expertpool] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the pipeline
def build(cfg: BuildConfig) -> dict:
    """Build (or resume) the pool at ``cfg.pool``; returns the build report."""
    started = time.perf_counter()
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.progress)
    data = load_data(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
    hierarchy = resolve_hierarchy(cfg.hierarchy, data.default_hierarchy, data.classes)
    if len(hierarchy.classes) != len(data.classes):
        raise UserError(f"hierarchy has {len(hierarchy.classes)} classes, data set {cfg.dataset} has {len(data.classes)}")
    rec = replace(recipe(cfg.dataset, cfg.preset), loss_terms=tuple(cfg.loss_terms))
    rec = check_pretrained(with_oracle_spec(rec, cfg.oracle)[0], cfg)
    store = Store(cfg.pool, create=True)
    catalog = make_catalog(cfg, data, hierarchy, rec)
    check_resume(store, catalog)
    store.set_catalog({**store.catalog, **catalog, "precision": "bf16" if runtime.bf16 else "fp32"})
    log(f"building pool {cfg.pool}: {cfg.dataset}, preset {cfg.preset}, {len(hierarchy.tasks)} tasks, "
        f"device {runtime.device}, {'bf16' if runtime.bf16 else 'fp32'}")

    oracle = stage_oracle(store, data, rec, cfg, runtime)
    library = stage_library(store, data, rec, cfg, runtime, oracle)
    extract_experts(store, data, hierarchy, rec, cfg.seed, runtime, oracle, library, list(hierarchy.tasks))
    total = round(time.perf_counter() - started, 1)
    store.set_catalog({**store.catalog, "build_seconds_last_run": total})
    log(f"pool {cfg.pool} ready in {total} s")
    report = pool_report(store)
    store.close()
    return report


def make_catalog(cfg: BuildConfig, data: ImageData, hierarchy: Hierarchy, rec: Recipe) -> dict:
    return {
        "dataset": cfg.dataset, "data_root": cfg.data_root, "preset": cfg.preset, "seed": cfg.seed,
        "hierarchy": hierarchy.to_json(), "recipe": rec.to_json(), "software_version": __version__,
        "input": {"shape": list(data.input_shape), "mean": list(data.test.mean), "std": list(data.test.std)},
        "oracle_source": cfg.oracle or "trained",
    }


RESUME_KEYS = ("dataset", "preset", "seed", "hierarchy", "recipe", "input", "oracle_source")


def check_resume(store: Store, catalog: dict) -> None:
    """A pool can only be resumed with the arguments it was started with."""
    old = store.catalog
    if not old:
        return
    import json

    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731  (tuples vs lists)
    diff = [k for k in RESUME_KEYS if k in old and not same(old[k], catalog[k])]
    if diff:
        raise UserError(f"pool {store.path} was started with other arguments ({', '.join(diff)} differ); "
                        "resume with the same arguments or choose a new --pool path")


def _net(config: dict, data: ImageData, num_classes: int | None = None, **extra) -> tuple[dict, nn.Module]:
    config = {**config, **extra}
    if config["arch"] in ("wrn", "wrn_library", "mobilenet_v2_library"):
        config["in_channels"] = data.input_shape[0]
    if num_classes is not None:
        config["num_classes"] = num_classes
    return config, create(config)


def _seeded(seed: int, name: str) -> int:
    s = component_seed(seed, name)
    torch.manual_seed(s)
    return s


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def with_oracle_spec(rec: Recipe, spec: str | None) -> tuple[Recipe, str | None]:
    """``--oracle torchvision:NAME:FILE``: the recipe with torchvision's NAME classifier as its oracle, and
    FILE; a plain ``--oracle FILE`` keeps the recipe's oracle (FILE holds its weights)."""
    if not spec or not spec.startswith("torchvision:"):
        return rec, spec
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UserError(f"--oracle {spec!r}: expected torchvision:NAME:FILE, e.g. torchvision:resnet50:weights.pth")
    import torchvision

    if parts[1] not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"--oracle {spec!r}: torchvision has no classifier named {parts[1]!r}")
    return replace(rec, oracle={"arch": "torchvision", "name": parts[1]}), parts[2]


def check_pretrained(rec: Recipe, cfg: BuildConfig) -> Recipe:
    """A torchvision oracle and a MobileNetV2 library are pretrained: their weights must be given."""
    if rec.oracle["arch"] == "torchvision" and not cfg.oracle:
        raise UserError(f"the {cfg.dataset} recipe's oracle is pretrained: pass --oracle torchvision:NAME:FILE "
                        f"(or --oracle FILE with {rec.oracle['name']} weights)")
    mobilenet = rec.library["arch"] == "mobilenet_v2_library"
    if mobilenet and not cfg.library_weights:
        raise UserError(f"the {cfg.dataset} recipe's library is a pretrained MobileNetV2: pass --library-weights FILE")
    if cfg.library_weights and not mobilenet:
        raise UserError(f"--library-weights is for the MobileNetV2 library (--dataset imagenet), not {cfg.dataset}")
    return rec


def _pretrained_library(store: Store, data: ImageData, rec: Recipe, cfg: BuildConfig) -> nn.Module:
    """The front of a pretrained MobileNetV2 (``--library-weights``), stored as it is: no distillation.

    The stored config names no file: the pool's blob holds the weights."""
    config = {**rec.library, "in_channels": data.input_shape[0]}
    library = create(config)
    try:
        state = _load_state_dict(cfg.library_weights)
        own = library.state_dict()
        library.load_state_dict({k: v for k, v in state.items() if k in own})
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot load MobileNetV2 weights {cfg.library_weights}: {str(e).splitlines()[0]}") from None
    with open(cfg.library_weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    log(f"library: pretrained MobileNetV2 front from {cfg.library_weights} ({count_params(library):,} params), "
        "stored without distillation")
    meta = {"config": config, "pretrained": True, "weights_sha256": digest,
            "oracle_sha256": store.summary("oracle")["sha256"] if store.has("oracle") else None}
    store.put("library", "library", library, meta,
              {"pretrained": True, "student_accuracy": None, "params": count_params(library)})
    return store.get("library").build()


def stage_oracle(store: Store, data: ImageData, rec: Recipe, cfg: BuildConfig, runtime: Runtime) -> nn.Module:
    if store.has("oracle"):
        log("oracle: found in pool, loaded")
        return store.get("oracle").build()
    seed = _seeded(cfg.seed, "oracle")
    config, oracle = _net(rec.oracle, data, len(data.classes))
    stats: dict = {}
    if cfg.oracle:
        oracle_file = with_oracle_spec(rec, cfg.oracle)[1]
        try:
            oracle.load_state_dict(_load_state_dict(oracle_file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot load oracle checkpoint {oracle_file}: {str(e).splitlines()[0]}") from None
        log(f"oracle: loaded from {cfg.oracle}")
    else:
        log(f"oracle: training {config['arch']}-{config.get('depth')}-{config.get('width')} "
            f"({count_params(oracle):,} params) for {rec.oracle_train.epochs} epochs")
        tc = rec.oracle_train
        stats = fit(oracle, lambda e, g: data.train.batches(tc.batch_size, True, True, g, drop_last=True),
                    lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), tc, runtime, seed, "oracle",
                    data.train.num_batches(tc.batch_size, True))
    acc = accuracy(oracle, data.test, runtime)
    log(f"oracle: test accuracy on all {len(data.classes)} classes {acc:.2f} %")
    meta = {"config": config, "classes": list(range(len(data.classes))), "train": rec.oracle_train.to_json(),
            "seed": seed, "source": cfg.oracle or "trained"}
    store.put("oracle", "oracle", oracle, meta, {"accuracy": acc, **stats, "params": count_params(oracle)})
    return store.get("oracle").build()


def cached_views(split: Split, views: int, seed: int, batch_size: int, fns: list, runtime: Runtime) -> list[list]:
    """For each of ``views`` fixed augmented views of ``split``: the outputs of every fn in ``fns``
    (e.g. the oracle's logits, the library's features), plus the uint8 images and labels."""
    out = []
    for v in range(views):
        g = torch.Generator().manual_seed(component_seed(seed, f"view/{v}"))
        xs, ys = [], []
        for x, y in split.batches(batch_size, shuffle=False, augment=True, generator=g):
            xs.append(x)
            ys.append(y)
        out.append([predict(fn, xs, runtime) if isinstance(fn, nn.Module) else fn(xs) for fn in fns]
                   + [torch.cat(ys)])
    return out


def _view_batches(tensors: list[list[torch.Tensor]], batch_size: int):
    """A ``batches`` function for ``fit`` that cycles through cached views, shuffled by the generator."""
    def batches(epoch: int, g: torch.Generator):
        view = tensors[epoch % len(tensors)]
        n = len(view[0])
        order = torch.randperm(n, generator=g)
        stop = n - n % batch_size if n >= batch_size else n
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield tuple(t[idx] for t in view)
    return batches


def stage_library(store: Store, data: ImageData, rec: Recipe, cfg: BuildConfig, runtime: Runtime,
                  oracle: nn.Module) -> nn.Module:
    if store.has("library"):
        log("library: found in pool, loaded")
        return store.get("library").build()
    if rec.library["arch"] == "mobilenet_v2_library":
        return _pretrained_library(store, data, rec, cfg)
    seed = _seeded(cfg.seed, "library")
    lib_config, library = _net(rec.library, data)
    head_config = {**rec.expert, "depth": rec.library["depth"], "width": rec.library.get("width", 1),
                   "in_channels": library.out_channels, "num_classes": len(data.classes)}
    student = Classifier(library, create(head_config))
    tc, T = rec.student_train, rec.temperature
    log(f"library: distilling a student ({count_params(student):,} params) from the oracle, {tc.epochs} epochs"
        + (f", oracle logits cached on {rec.student_views} views" if rec.student_views else ""))
    if rec.student_views:
        t0 = time.perf_counter()
        views = cached_views(data.train, rec.student_views, seed, INFER_BATCH,
                             [oracle, lambda xs: torch.cat(xs).to(torch.bfloat16 if runtime.bf16 else torch.float32)],
                             runtime)
        log(f"library: oracle logits for {rec.student_views} views in {time.perf_counter() - t0:.1f} s")
        batches = _view_batches([[x, t] for t, x, _ in views], tc.batch_size)
        loss = lambda m, b: soft_loss(m(b[0].float()), b[1], T)  # noqa: E731
    else:
        oracle = runtime.prepare(oracle).eval()

        def loss(m, b):
            with torch.no_grad():
                t = oracle(b[0])
            return soft_loss(m(b[0]), t, T)

        batches = lambda e, g: data.train.batches(tc.batch_size, True, True, g, drop_last=True)  # noqa: E731
    stats = fit(student, batches, loss, tc, runtime, seed, "library", data.train.num_batches(tc.batch_size, True))
    acc = accuracy(student, data.test, runtime)
    log(f"library: student test accuracy on all classes {acc:.2f} % ({stats['images_per_s']:.0f} images/s)")
    library = student.library
    meta = {"config": lib_config, "train": tc.to_json(), "temperature": T, "seed": seed,
            "oracle_sha256": store.summary("oracle")["sha256"] if store.has("oracle") else None}
    store.put("library", "library", library, meta,
              {"student_accuracy": acc, **stats, "params": count_params(library)})
    return store.get("library").build()


def extract_experts(store: Store, data: ImageData, hierarchy: Hierarchy, rec: Recipe, seed: int,
                    runtime: Runtime, oracle: nn.Module, library: nn.Module, tasks: list[str],
                    views: list | None = None) -> None:
    """Train (by L_CKD on the frozen library) the expert of every task in ``tasks`` not yet in the pool.

    ``views``: precomputed ``[[library features, oracle logits], ...]`` per view (e.g. shared by several
    pools with the same library, as in the loss ablation); computed here when None."""
    todo = [t for t in tasks if not store.has(expert_name(t))]
    if not todo:
        log("experts: all found in pool")
        return
    library_sha = store.summary("library")["sha256"]
    tc, T, alpha = rec.expert_train, rec.temperature, rec.alpha
    soft, scale = "soft" in rec.loss_terms, "scale" in rec.loss_terms
    t0 = time.perf_counter()
    if rec.expert_views and views is not None:
        log(f"experts: reusing {len(views)} precomputed views of library features and oracle logits")
    elif rec.expert_views:
        views = cached_views(data.train, rec.expert_views, seed, INFER_BATCH, [library, oracle], runtime)
        views = [[f.to(torch.bfloat16) if runtime.bf16 else f, t] for f, t, _ in views]
        log(f"experts: library features and oracle logits for {rec.expert_views} views in "
            f"{time.perf_counter() - t0:.1f} s (reused by all {len(todo)} experts)")
    else:
        frozen = [runtime.prepare(library).eval(), runtime.prepare(oracle).eval()]
    test_features = predict(library, (x for x, _ in data.test.batches(INFER_BATCH)), runtime)
    for chunk in expert_chunks(hierarchy, JOINT_CHUNK if rec.expert["arch"] == "wrn_expert" else 1):
        if not any(t in todo for t in chunk):
            continue
        experts, configs, seeds = [], [], []
        for task in chunk:
            seeds.append(_seeded(seed, expert_name(task)))
            config, expert = _net(rec.expert, data, len(hierarchy.tasks[task]), in_channels=library.out_channels)
            configs.append(config)
            experts.append(expert)
        idxs = [torch.tensor(hierarchy.tasks[t]) for t in chunk]
        joint = all(isinstance(e, WRNExpert) for e in experts)
        model = ExpertGroup(experts) if joint else experts[0]
        if not joint and len(chunk) > 1:
            raise UserError("only WideResNet experts can be extracted jointly; use one task per chunk")

        def loss_from(outs, t):
            outs = outs if joint else [outs]
            return sum(ckd_loss(o, t[:, i], T, alpha, soft, scale) for o, i in zip(outs, idxs))

        if rec.expert_views:
            batches = _view_batches(views, tc.batch_size)
            steps = len(views[0][0]) // tc.batch_size

            def loss(m, b):
                return loss_from(m(b[0]), b[1])
        else:
            batches = lambda e, g: data.train.batches(tc.batch_size, True, True, g, drop_last=True)  # noqa: E731
            steps = data.train.num_batches(tc.batch_size, True)

            def loss(m, b):
                with torch.no_grad():
                    f, t = frozen[0](b[0]), frozen[1](b[0])
                return loss_from(m(f), t)
        chunk_seed = component_seed(seed, "experts/" + ",".join(chunk))
        label = f"experts {','.join(chunk)}" if len(chunk) < 4 else f"{len(chunk)} experts jointly"
        stats = fit(model, batches, loss, tc, runtime, chunk_seed, label, steps)
        trained = dict(zip(chunk, zip(model.unpack() if joint else [model], configs, seeds)))
        for task in [t for t in todo if t in trained]:  # in the order asked (a chunk's stored experts were
            expert, config, cseed = trained[task]       # trained again only because it is trained whole)
            classes = hierarchy.tasks[task]
            acc = task_accuracy(expert, test_features, data.test, classes, runtime)
            meta = {"config": config, "task": task, "classes": classes,
                    "class_names": [hierarchy.classes[c] for c in classes], "library_sha256": library_sha,
                    "train": tc.to_json(), "temperature": T, "alpha": alpha, "loss_terms": list(rec.loss_terms),
                    "seed": cseed, "trained_with": chunk}
            metrics = {"accuracy": acc, **stats, "seconds": round(stats["seconds"] / len(chunk), 2),
                       "chunk_seconds": stats["seconds"], "params": count_params(expert)}
            store.put(expert_name(task), "expert", expert, meta, metrics, task=task)
            log(f"expert {task}: accuracy on its task {acc:.2f} % ({metrics['seconds']:.1f} s per expert)")


JOINT_CHUNK = 32  # experts trained together in one grouped network


def expert_chunks(hierarchy: Hierarchy, size: int = JOINT_CHUNK) -> list[list[str]]:
    """The groups in which experts are trained jointly: the hierarchy's tasks sorted by name, in chunks.

    A chunk with any missing expert is trained as a whole (storing only what is missing), so an expert's
    weights depend only on the run seed, the frozen parts and its chunk: a resumed build, and a task removed
    and added back, give the same bytes as before. Only WideResNet experts train jointly: others use size 1."""
    names = sorted(hierarchy.tasks)
    return [names[i:i + size] for i in range(0, len(names), size)]


def task_accuracy(expert: nn.Module, test_features: torch.Tensor, test: Split, classes: list[int],
                  runtime: Runtime) -> float:
    """An expert's accuracy on its own primitive task's test images (given the library's test features)."""
    lut = torch.full((int(test.labels.max()) + 1,), -1)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    rel = lut[test.labels]
    keep = rel >= 0
    logits = predict(expert, test_features[keep].split(INFER_BATCH), runtime)
    return round(100.0 * (logits.argmax(1) == rel[keep]).float().mean().item(), 3)


def pool_report(store: Store) -> dict:
    """Metrics of every stored component, as the paper's code prints them after a build."""
    out = {"pool": str(store.path), "catalog": {k: store.catalog.get(k) for k in ("dataset", "preset", "seed")}}
    for name in store.names():
        s = store.summary(name)
        out[name] = {"sha256": s["sha256"], **s["metrics"]}
    return out


# --------------------------------------------------------------------------- incremental pools (issue 3)
def recipe_from_json(d: dict) -> Recipe:
    """The ``Recipe`` recorded in a pool's catalog."""
    def tc(x: dict) -> TrainConfig:
        return TrainConfig(**{**x, "milestones": tuple(x.get("milestones", ()))})

    return Recipe(d["oracle"], d["library"], d["expert"], tc(d["oracle_train"]), tc(d["student_train"]),
                  tc(d["expert_train"]), d.get("temperature", 4.0), d.get("alpha", 0.3), d.get("student_views", 0),
                  d.get("expert_views", 0), tuple(d.get("loss_terms", ("soft", "scale"))))


def _class_ids(refs: list, classes: list[str]) -> list[int]:
    """Class references (names, or indices as ints or digit strings) -> indices."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in refs:
        if isinstance(r, str) and r in index:
            out.append(index[r])
        elif isinstance(r, int) or (isinstance(r, str) and r.isdigit()):
            out.append(int(r))
        else:
            raise UserError(f"unknown class {r!r}; give class names or indices 0..{len(classes) - 1}")
    return out


def add_task(pool_path: str, name: str, classes: list, data_root: str | None = None, device: str = "auto",
             precision: str | None = None, progress: bool = True) -> dict:
    """Extract the expert of a new primitive task into an existing pool, with the oracle, data, seed and
    recipe recorded in its catalog; every other component is left as it is. The task is first added to
    the catalog's hierarchy, then its expert is stored in its own transaction, so an interrupted add-task
    is finished by running it again. Seeded by the run seed and the task's name, so removing and adding
    back a task gives back the same expert, bit for bit."""
    store = Store(pool_path)
    try:
        cat = store.catalog
        if "hierarchy" not in cat or "recipe" not in cat:
            raise UserError(f"pool {pool_path} has no build catalog (add tasks to pools made by `expertpool build`)")
        if not store.has("oracle"):
            raise UserError(f"pool {pool_path} has no oracle weights (stripped or imported): add-task needs the "
                            "oracle; add the task to the full pool, then strip it again")
        if not store.has("library"):
            raise UserError(f"pool {pool_path} has no library yet: finish its build first")
        hierarchy = Hierarchy.from_json(cat["hierarchy"])
        ids = _class_ids(list(classes), hierarchy.classes)
        if name in hierarchy.tasks:
            if store.has(expert_name(name)):
                raise UserError(f"task {name!r} already has an expert in pool {pool_path} (remove-task it first)")
            if hierarchy.tasks[name] != ids:
                raise UserError(f"task {name!r} is already in the hierarchy with classes {hierarchy.tasks[name]}")
        else:
            hierarchy = hierarchy.with_task(name, ids)
        runtime = resolve_runtime(device, precision or cat.get("precision", "auto"), progress)
        dataset = cat["dataset"]
        image_size = cat["input"]["shape"][-1] if dataset in ("imagefolder", "imagenet") else None
        data = load_data(dataset, data_root or cat.get("data_root"), image_size=image_size)
        if len(data.classes) != len(hierarchy.classes) or list(data.input_shape) != list(cat["input"]["shape"]):
            raise UserError(f"data set {dataset} at {data_root or cat.get('data_root')} does not match the pool "
                            f"({len(data.classes)} classes, input {list(data.input_shape)})")
        store.update_catalog(hierarchy=hierarchy.to_json())
        log(f"add-task {name}: classes {[hierarchy.classes[c] for c in ids]}")
        oracle, library = store.get("oracle").build(), store.get("library").build()
        extract_experts(store, data, hierarchy, recipe_from_json(cat["recipe"]), cat["seed"], runtime, oracle,
                        library, [name])
        s = store.summary(expert_name(name))
        return {"pool": str(store.path), "task": name, "classes": s["meta"].get("class_names"),
                "sha256": s["sha256"], "metrics": s["metrics"]}
    finally:
        store.close()


def remove_task(pool_path: str, name: str) -> dict:
    """Remove a task's expert and the task itself from the pool's hierarchy, in one transaction."""
    store = Store(pool_path)
    try:
        cat = store.catalog
        if "hierarchy" not in cat:
            raise UserError(f"pool {pool_path} has no catalog yet")
        hierarchy = Hierarchy.from_json(cat["hierarchy"])
        if name not in hierarchy.tasks:
            raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(hierarchy.tasks)}")
        if len(hierarchy.tasks) == 1:
            raise UserError(f"task {name!r} is the pool's only task; a pool needs at least one")
        had = store.summary(expert_name(name))["sha256"] if store.has(expert_name(name)) else None
        store.delete(expert_name(name), {**cat, "hierarchy": hierarchy.without_task(name).to_json()})
        return {"pool": str(store.path), "removed": name, "sha256": had}
    finally:
        store.close()
