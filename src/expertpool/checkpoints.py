"""Import of pools made by the paper's research code: plain state dicts saved with ``torch.save``.

The research code keeps its library (``WideResNet_EX``: ``conv1``, ``block1``, ``block2``) and every expert
(``WideResNet_CL``: ``block3``, ``bn1``, ``fc``) in files of their own; file names are its only metadata.
Our WideResNet parts use the same parameter names and the same pre-activation blocks (DESIGN.md,
"Checkpoint layout of the research code"), so a checkpoint maps onto ``WRNLibrary`` / ``WRNExpert`` key
for key; depth, width, input channels and the number of classes are read off the tensors' shapes.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects. Tolerated variations: a ``state_dict`` / ``model`` / ``net`` wrapper dict, a ``module.``
prefix (``DataParallel``), and missing ``num_batches_tracked`` buffers (checkpoints from PyTorch < 0.4.1).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .nets import count_params, create
from .store import Store, expert_name

# Input spec of the data sets a research-code pool can come from (no need for the data itself to import).
INPUTS = {
    "cifar100": {"shape": [3, 32, 32], "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
    "tinyimagenet": {"shape": [3, 64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "imagenet": {"shape": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "fashion-mnist": {"shape": [1, 28, 28], "mean": [0.2860], "std": [0.3530]},
    "synthetic": {"shape": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}
FIRST_STRIDE = {"tinyimagenet": 2}  # the Tiny-ImageNet library has a stride-2 first conv


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A research-code checkpoint as a flat ``{name: float tensor}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (not weights-only / not a pickle), RuntimeError (zip), EOFError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} as a state dict: {msg}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} is not a state dict (a dict of tensors)")
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _group_blocks(sd: dict, group: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{group}\.layer\.(\d+)\.", k))}
    if not idx or idx != set(range(len(idx))):
        raise UserError(f"no {group}.layer.0 ... {group}.layer.N blocks in the checkpoint")
    return len(idx)


def _shape(sd: dict, key: str, what: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"{what}: key {key!r} missing; not a research-code {what} checkpoint")
    if sd[key].ndim != ndim:
        raise UserError(f"{what}: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dimensions")
    return tuple(sd[key].shape)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def library_config(sd: dict, first_stride: int = 1) -> dict:
    """Config of the ``WRNLibrary`` a research-code ``WideResNet_EX`` state dict fits."""
    stem = _shape(sd, "conv1.weight", "library", 4)
    c1 = _shape(sd, "block1.layer.0.conv1.weight", "library", 4)[0]
    c2 = _shape(sd, "block2.layer.0.conv1.weight", "library", 4)[0]
    n1, n2 = _group_blocks(sd, "block1"), _group_blocks(sd, "block2")
    if stem[0] != 16 or n1 != n2 or c1 % 16 or c2 != 2 * c1:
        raise UserError(f"library: shapes do not fit a WideResNet front (stem {stem[0]} channels, groups of "
                        f"{n1}/{n2} blocks, widths {c1}/{c2})")
    return {"arch": "wrn_library", "depth": 6 * n1 + 4, "width": _num(c1 / 16), "in_channels": stem[1],
            "first_stride": first_stride}


def expert_config(sd: dict) -> dict:
    """Config of the ``WRNExpert`` a research-code ``WideResNet_CL`` state dict fits."""
    conv = _shape(sd, "block3.layer.0.conv1.weight", "expert", 4)
    fc = _shape(sd, "fc.weight", "expert", 2)
    if fc[1] != conv[0]:
        raise UserError(f"expert: fc takes {fc[1]} features but block3 gives {conv[0]}")
    return {"arch": "wrn_expert", "num_classes": fc[0], "in_channels": conv[1],
            "depth": 6 * _group_blocks(sd, "block3") + 4, "width": _num(conv[0] / 64)}


def to_module(sd: dict, config: dict, what: str) -> torch.nn.Module:
    """Our network for ``config`` with the checkpoint's weights; every key must match, none left over."""
    net = create(config)
    own = net.state_dict()
    sd = dict(sd)
    for k in own:  # BN counters that PyTorch < 0.4.1 did not save
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise UserError(f"{what}: keys do not match a research-code checkpoint of this shape "
                        f"(missing: {', '.join(missing[:4]) or '-'}; unexpected: {', '.join(extra[:4]) or '-'})")
    try:
        net.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})
    except RuntimeError as e:
        raise UserError(f"{what}: {str(e).splitlines()[-1].strip()}") from None
    return net.eval()


def _file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def import_checkpoints(pool: str, library: str, experts: dict[str, str], hierarchy: str,
                       dataset: str | None = None, first_stride: int | None = None) -> dict:
    """Write a new pool from a research-code library checkpoint and expert checkpoints ``{task: file}``.

    The pool has no oracle (its catalog says so); its composed models compute exactly what the research
    code's ``WideResNet_CL(WideResNet_EX(x))`` per expert, concatenated, computes."""
    from .hierarchy import resolve as resolve_hierarchy

    out = Path(pool)
    if out.exists():
        raise UserError(f"pool {out} already exists; import into a new file")
    if not experts:
        raise UserError("name at least one expert: --expert TASK=FILE")
    h = resolve_hierarchy(hierarchy, None)
    dataset = dataset or (h.name if h.name in INPUTS else None)
    if dataset not in INPUTS:
        raise UserError(f"say which data set the checkpoints were trained on: --dataset {{{','.join(INPUTS)}}}")
    for task in experts:
        h.task_classes(task)  # UserError for an unknown task
    stride = first_stride or FIRST_STRIDE.get(dataset, 1)
    lib_sd = load_state_dict(library)
    lib_config = library_config(lib_sd, stride)
    if lib_config["in_channels"] != INPUTS[dataset]["shape"][0]:
        raise UserError(f"library takes {lib_config['in_channels']} input channels; {dataset} images have "
                        f"{INPUTS[dataset]['shape'][0]}")
    lib = to_module(lib_sd, lib_config, f"library {library}")
    nets = {}
    for task, path in experts.items():
        sd = load_state_dict(path)
        config = expert_config(sd)
        n = len(h.tasks[task])
        if config["num_classes"] != n:
            raise UserError(f"expert {task} ({path}) has {config['num_classes']} outputs; task {task} has {n} classes")
        if config["in_channels"] != lib.out_channels:
            raise UserError(f"expert {task} ({path}) takes {config['in_channels']} channels; the library gives "
                            f"{lib.out_channels}")
        nets[task] = (config, to_module(sd, config, f"expert {task} {path}"), path)

    partial = out.with_name(out.name + ".partial")
    for p in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        p.unlink(missing_ok=True)
    store = Store(partial, create=True)
    try:
        store.set_catalog({
            "dataset": dataset, "data_root": None, "preset": "imported", "seed": None,
            "hierarchy": h.to_json(), "recipe": None, "software_version": __version__,
            "input": dict(INPUTS[dataset]), "oracle_source": "none (imported from research-code checkpoints)",
            "oracle": None,
            "imported": {"library": {"file": str(library), "sha256": _file_sha256(library)},
                         "experts": {t: {"file": str(p), "sha256": _file_sha256(p)} for t, (_, _, p) in nets.items()}},
        })
        source = "research-code checkpoint"
        lib_sha = store.put("library", "library", lib, {"config": lib_config, "source": source},
                            {"params": count_params(lib)})
        for task, (config, net, path) in nets.items():
            classes = h.tasks[task]
            meta = {"config": config, "task": task, "classes": classes, "class_names": [h.classes[c] for c in classes],
                    "library_sha256": lib_sha, "source": source}
            store.put(expert_name(task), "expert", net, meta, {"params": count_params(net)}, task=task)
    except BaseException:
        store.close()
        partial.unlink(missing_ok=True)
        raise
    store.close()
    os.replace(partial, out)
    return {"pool": str(out), "dataset": dataset, "library": {"config": lib_config, "sha256": lib_sha},
            "experts": sorted(nets)}
