"""Class-level queries: which primitive tasks cover the classes a user asks for, and (train-free) pruning.

    tasks, wanted = cover(pool, ["cat", "bus"])        # the smallest set of tasks holding every class
    model = compose_classes(pool, ["cat", "bus"], only_requested=True)

A class belongs to exactly one primitive task (``hierarchy.validate`` enforces it), so the smallest
covering set is unique: the owners of the requested classes, listed in the pool's task order.

``only_requested`` drops, in each chosen expert's last layer (``fc``), the output rows of classes that
were not asked for. Nothing is trained: the kept rows are the same numbers, so the pruned model's logits
equal the full model's logits on those columns. Softmax probabilities are then over the requested classes
only (which is what the user asked for). The result is a ``ComposedModel`` (same attributes: ``labels``,
``label_groups``, ``tasks``, ``class_ids``, ``group_sizes``, ``library``, ``experts``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compose import ComposedModel
from .errors import UserError


def resolve_classes(pool, classes: list) -> list[int]:
    """Class names (or integer indices) -> class indices; rejects empty, unknown and duplicate entries."""
    names = pool.classes
    if not classes:
        raise UserError("empty query: name one or more classes")
    index = {n: i for i, n in enumerate(names)}
    ids: list[int] = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise UserError(f"a class is a name or an index, got {c!r}")
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise UserError(f"unknown class index {c} (valid: 0..{len(names) - 1})")
            ids.append(c)
        elif c in index:
            ids.append(index[c])
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise UserError(f"unknown class {c!r}; valid classes: {shown}")
    dup = sorted({names[i] for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"duplicate class(es) in query: {', '.join(dup)}")
    return ids


def cover(pool, classes: list) -> tuple[list[str], list[int]]:
    """(smallest list of primitive tasks with an expert that holds every requested class, class indices)."""
    ids = resolve_classes(pool, classes)
    owner = {c: t for t, members in pool.hierarchy.tasks.items() for c in members}
    available = set(pool.tasks)
    missing = [pool.classes[c] for c in ids if owner.get(c) not in available]
    if missing:
        raise UserError(f"no expert in this pool covers class(es): {', '.join(missing)}")
    needed = {owner[c] for c in ids}
    return [t for t in pool.tasks if t in needed], ids


def prune_expert(expert: nn.Module, rows: list[int]) -> nn.Module:
    """A copy of ``expert`` sharing every layer but ``fc``, whose output rows are ``rows`` of the original."""
    fc = getattr(expert, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError(f"only_requested needs experts with a linear last layer `fc`; {type(expert).__name__} has none")
    new_fc = nn.Linear(fc.in_features, len(rows), bias=fc.bias is not None)
    idx = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        new_fc.weight.copy_(fc.weight.index_select(0, idx))
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias.index_select(0, idx))
    new_fc.train(fc.training)
    out = copy.copy(expert)  # same class; its own module table so the original keeps its fc
    out._modules = dict(expert._modules)
    out._parameters = dict(expert._parameters)
    out._buffers = dict(expert._buffers)
    out._modules["fc"] = new_fc.to(fc.weight.device)
    return out


def only_requested(model, keep: list[int] | set[int]) -> ComposedModel:
    """``model`` with each expert's output rows limited to the class indices in ``keep`` (train-free)."""
    keep = set(keep)
    experts, tasks, labels, ids, sizes = [], [], [], [], []
    start = 0
    for task, expert, n in zip(model.tasks, model.experts, model.group_sizes):
        cols = [j for j in range(start, start + n) if model.class_ids[j] in keep]
        start += n
        if not cols:
            continue  # an expert none of whose classes were asked for is dropped entirely
        rows = [j - (start - n) for j in cols]
        experts.append(expert if len(rows) == n else prune_expert(expert, rows))
        tasks.append(task)
        labels += [model.labels[j] for j in cols]
        ids += [model.class_ids[j] for j in cols]
        sizes.append(len(cols))
    if not experts:
        raise UserError("empty query: none of the requested classes is in this model")
    return ComposedModel(model.library, experts, tasks, labels, ids, sizes).eval()


def compose_classes(pool, classes: list, only_requested_rows: bool = False):
    """The composite model covering ``classes``; with ``only_requested_rows`` only their output columns."""
    tasks, ids = cover(pool, classes)
    model = pool.compose(tasks)
    return only_requested(model, ids) if only_requested_rows else model
