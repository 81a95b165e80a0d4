"""Measurements: accuracy on a class subset, cross-expert errors, parameters, FLOPs, latency."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .data import Split
from .train import Runtime, predict

EVAL_BATCH = 256


def logits_on(model: nn.Module, split: Split, runtime: Runtime) -> torch.Tensor:
    return predict(model, (x for x, _ in split.batches(EVAL_BATCH)), runtime)


def accuracy(model: nn.Module, split: Split, runtime: Runtime) -> float:
    """Top-1 accuracy (%) of ``model`` whose output j is the split's label j."""
    if len(split) == 0:
        return float("nan")
    return round(100.0 * (logits_on(model, split, runtime).argmax(1) == split.labels).float().mean().item(), 3)


def cross_expert_ratio(logits: torch.Tensor, labels: torch.Tensor, group_sizes: list[int]) -> dict:
    """Errors whose argmax falls in another expert's classes, as a share (%) of all errors (paper, Table 6).

    The logits' columns are the experts' classes side by side, ``group_sizes[i]`` columns for expert i.
    """
    owner = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    pred = logits.argmax(1)
    wrong = pred != labels
    cross = wrong & (owner[pred] != owner[labels])
    errors = int(wrong.sum())
    return {"errors": errors, "cross_expert_errors": int(cross.sum()),
            "cross_expert_ratio": round(100.0 * int(cross.sum()) / errors, 3) if errors else 0.0}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one image through ``model`` (torch's own counter: 2 per multiply-add)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def alternating_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in turns so that all see the same machine load: ``rounds``
    times, each function runs ``warmup`` untimed calls then ``calls`` timed ones (a run of consecutive calls,
    as a serving loop makes them)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return times


def timeit_ms(fn: Callable[[], object], repeat: int = 200, warmup: int = 5) -> dict:
    """p50 / p99 / mean wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50": round(statistics.median(times), 4), "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 4),
            "mean": round(statistics.fmean(times), 4), "n": repeat}
