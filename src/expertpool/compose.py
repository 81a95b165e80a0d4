"""Consolidation: the library and the chosen experts put together into one model, with no training.

``ComposedModel(x) = concat_i expert_i(library(x))``: the output columns are the experts' classes side by
side, in the order the tasks were asked for; ``labels`` names every column and ``label_groups`` says which
columns belong to which primitive task, so an exported model needs no side table.
"""

from __future__ import annotations

import torch
from torch import nn


class ComposedModel(nn.Module):
    def __init__(self, library: nn.Module, experts: list[nn.Module], tasks: list[str], labels: list[str],
                 class_ids: list[int], group_sizes: list[int]):
        super().__init__()
        self.library = library
        self.experts = nn.ModuleList(experts)
        self.tasks = list(tasks)
        self.labels = list(labels)  # class name of each output column
        self.class_ids = list(class_ids)  # data-set class index of each output column
        self.group_sizes = list(group_sizes)

    @property
    def label_groups(self) -> dict[str, list[str]]:
        out, start = {}, 0
        for task, n in zip(self.tasks, self.group_sizes):
            out[task] = self.labels[start:start + n]
            start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.library(x)
        return torch.cat([expert(f) for expert in self.experts], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 1) -> list[list[tuple[str, float]]]:
        """Top-``k`` (label, probability) pairs per image (softmax over the composite task's classes)."""
        probs = self.eval()(x).softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(self.labels[j], round(float(p), 6)) for p, j in zip(ps, js)]
                for ps, js in zip(top.values, top.indices)]
