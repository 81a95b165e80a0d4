"""Distillation losses as pure functions of logits (student ``s``, teacher ``t``).

* ``soft_loss``  L_soft  = T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean (Hinton's KD).
* ``scale_loss`` L_scale = mean |s - t| on raw logits: keeps every expert's logits on the oracle's scale,
  which is what lets separately trained experts be concatenated without training.
* ``ckd_loss``   L_CKD   = L_soft + alpha * L_scale (conditional KD; ``t`` is the oracle restricted to a task).
* ``uhc_loss`` / ``sd_loss``: the paper's two multi-teacher baselines (unifying heterogeneous classifiers,
  standard distillation with zero-padded teacher outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 4.0
ALPHA = 0.3


def soft_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    log_q = F.log_softmax(s.float() / temperature, dim=1)
    p = F.softmax(t.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def scale_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s.float() - t.float()).abs().mean()


def ckd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE, alpha: float = ALPHA,
             soft: bool = True, scale: bool = True) -> torch.Tensor:
    """L_CKD; ``soft``/``scale`` switch the terms off for the paper's ablation (Table 6)."""
    if not (soft or scale):
        raise ValueError("ckd_loss needs at least one of soft and scale")
    loss = soft_loss(s, t, temperature) if soft else s.new_zeros((), dtype=torch.float32)
    return loss + alpha * scale_loss(s, t) if scale else loss


def uhc_loss(s: torch.Tensor, teachers: list[torch.Tensor], temperature: float = TEMPERATURE) -> torch.Tensor:
    """Each teacher (expert) is matched on its own slice of the student's logits; KL averaged over teachers.

    ``teachers[i]`` has the logits of the i-th expert; the student's logits are the experts' classes side by
    side in the same order.
    """
    slices = torch.split(s, [t.shape[1] for t in teachers], dim=1)
    return sum(soft_loss(si, ti, temperature) for si, ti in zip(slices, teachers)) / len(teachers)


def sd_loss(s: torch.Tensor, teachers: list[torch.Tensor], temperature: float = TEMPERATURE) -> torch.Tensor:
    """Each teacher's softened output, zero-padded to all classes, is matched against the student's full
    softmax; KL averaged over teachers."""
    log_q = F.log_softmax(s.float() / temperature, dim=1)
    total, start = s.new_zeros((), dtype=torch.float32), 0
    for t in teachers:
        p = torch.zeros_like(log_q)
        p[:, start:start + t.shape[1]] = F.softmax(t.float() / temperature, dim=1)
        total = total + F.kl_div(log_q, p, reduction="batchmean") * temperature**2
        start += t.shape[1]
    return total / len(teachers)
