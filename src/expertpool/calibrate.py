"""Beyond the paper: task-arbitration calibration of experts, fitted once, with no labels and no training
of any network; consolidation stays train-free.

Why: a composed model predicts ``argmax`` over all its experts' logits. Inside one expert the argmax is
what that expert learned; *between* experts it is decided by whose largest logit is larger. The experts
were trained separately, so their logit scales only roughly agree (L_scale pulls them towards the
oracle's), and an image of task A is lost whenever expert B's top logit beats expert A's: a cross-expert
error, about half of all errors at n(Q) = 5 in the paper.

What: each expert i gets two numbers, a scale a_i > 0 and a bias b_i, and its logits become
``a_i * s + b_i``. A positive affine map keeps the argmax inside each expert, so it can only change the
arbitration between experts. The numbers are fitted, jointly over the pool's experts, on *unlabeled*
training images: the "label" of an image is the oracle's probability mass on each task's classes, and the
fit minimises the cross-entropy between that and ``softmax_i(a_i * max_c s_ic + b_i)`` (the arbitration
the composed argmax performs). It is 2 numbers per expert, fitted by L-BFGS in seconds from the library
features and oracle logits the pool's build caches anyway. A query then composes the experts as usual
and multiplies/shifts each expert's columns: still no training and still milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn

from .compose import ComposedModel
from .train import INFER_BATCH, Runtime, predict


class CalibratedModel(nn.Module):
    """A composed model whose expert i's logits are mapped to ``scale_i * s + bias_i``."""

    def __init__(self, model: ComposedModel, params: list[tuple[float, float]]):
        super().__init__()
        self.model = model
        sizes = torch.tensor(model.group_sizes)
        self.register_buffer("scale", torch.tensor([p[0] for p in params]).repeat_interleave(sizes))
        self.register_buffer("bias", torch.tensor([p[1] for p in params]).repeat_interleave(sizes))
        self.tasks, self.labels = model.tasks, model.labels
        self.class_ids, self.group_sizes = model.class_ids, model.group_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale + self.bias


def expert_max_logits(experts: list[nn.Module], features: list[torch.Tensor], runtime: Runtime) -> torch.Tensor:
    """(N, k): each expert's largest logit on every cached feature map."""
    cols = []
    for expert in experts:
        logits = torch.cat([predict(expert, f.split(INFER_BATCH), runtime) for f in features])
        cols.append(logits.max(1).values)
    return torch.stack(cols, 1)


def task_posteriors(oracle_logits: list[torch.Tensor], task_classes: list[list[int]]) -> torch.Tensor:
    """(N, k): the oracle's probability of each task (softmax mass on its classes), renormalised over the
    given tasks."""
    p = torch.cat([t.float() for t in oracle_logits]).softmax(1)
    mass = torch.stack([p[:, c].sum(1) for c in task_classes], 1)
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-12)


def fit_arbitration(scores: torch.Tensor, targets: torch.Tensor, steps: int = 100) -> tuple[list[float], list[float]]:
    """Scales (> 0) and biases minimising CE(targets, softmax(scale * scores + bias)); biases centred."""
    k = scores.shape[1]
    log_a = torch.zeros(k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    scores, targets = scores.double(), targets.double()

    def closure():
        opt.zero_grad()
        z = scores * log_a.double().exp() + b.double()
        loss = -(targets * z.log_softmax(1)).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a = log_a.detach().exp()
    bias = b.detach() - b.detach().mean()
    return [round(float(v), 6) for v in a], [round(float(v), 6) for v in bias]


def fit_calibration(experts: dict[str, nn.Module], task_classes: dict[str, list[int]],
                    features: list[torch.Tensor], oracle_logits: list[torch.Tensor], runtime: Runtime) -> dict:
    """``{task: [scale, bias]}`` for every expert, from library features and oracle logits on unlabeled
    training images (e.g. ``baselines.FeatureViews``)."""
    tasks = list(experts)
    scores = expert_max_logits([experts[t] for t in tasks], features, runtime)
    targets = task_posteriors(oracle_logits, [task_classes[t] for t in tasks])
    scale, bias = fit_arbitration(scores, targets)
    return {t: [a, b] for t, a, b in zip(tasks, scale, bias)}
