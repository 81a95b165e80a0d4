"""Fused inference: the same composite model, rewritten for speed, numerically equal to the plain one.

* All chosen experts become ONE network: every convolution of the K experts becomes one grouped
  convolution (``groups=K``), every BatchNorm one BatchNorm over the K experts' channels side by side, and
  the K last layers one block-diagonal linear layer. The experts' shared input is repeated K times once.
* Every BatchNorm that directly follows a convolution (``bn2`` after ``conv1`` in each block, in the library
  and in the experts) is folded into that convolution.

Only WideResNet experts (``WRNExpert``) of one shape are fused; ``fuse`` refuses others with a ValueError.
Plain: ``ComposedModel``; fused: ``FusedComposedModel``, same ``labels`` / ``label_groups`` / ``class_ids``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

from .compose import ComposedModel
from .joint import pack_bn, pack_conv
from .nets import BasicBlock, WRNExpert, WRNLibrary


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one convolution with a bias (eval-mode statistics)."""
    scale, shift = _bn_affine(bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    groups=conv.groups, bias=True)
    with torch.no_grad():
        out.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        out.bias.copy_(shift + (conv.bias * scale if conv.bias is not None else 0))
    return out


class FusedBlock(nn.Module):
    """A ``BasicBlock`` in eval mode with ``bn2`` folded into ``conv1``; optionally K blocks grouped."""

    def __init__(self, blocks: list[BasicBlock]):
        super().__init__()
        self.bn1 = pack_bn([b.bn1 for b in blocks])
        self.conv1 = pack_conv([fold_conv_bn(b.conv1, b.bn2) for b in blocks])
        self.conv2 = pack_conv([b.conv2 for b in blocks])
        self.shortcut = None if blocks[0].convShortcut is None else pack_conv([b.convShortcut for b in blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.conv1(a)))
        return out + (x if self.shortcut is None else self.shortcut(a))


class FusedLibrary(nn.Module):
    def __init__(self, library: WRNLibrary):
        super().__init__()
        self.conv1 = copy.deepcopy(library.conv1)
        self.blocks = nn.Sequential(*[FusedBlock([b]) for g in (library.block1, library.block2) for b in g.layer])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv1(x))


class FusedExperts(nn.Module):
    """K WideResNet experts as one network: grouped convolutions and one block-diagonal linear layer."""

    def __init__(self, experts: list[WRNExpert]):
        super().__init__()
        if not all(isinstance(e, WRNExpert) for e in experts):
            raise ValueError("only WideResNet experts can be fused")
        shapes = {tuple(tuple(v.shape) for k, v in e.state_dict().items() if not k.startswith("fc.")) for e in experts}
        if len(shapes) != 1:
            raise ValueError("experts of different shapes cannot be fused")
        self.k = len(experts)
        self.blocks = nn.Sequential(*[FusedBlock([e.block3.layer[i] for e in experts])
                                      for i in range(len(experts[0].block3.layer))])
        self.bn = pack_bn([e.bn1 for e in experts])
        width = experts[0].fc.in_features
        sizes = [e.fc.out_features for e in experts]
        self.fc = nn.Linear(width * self.k, sum(sizes))
        with torch.no_grad():
            self.fc.weight.zero_()
            row = 0
            for i, e in enumerate(experts):
                self.fc.weight[row:row + sizes[i], i * width:(i + 1) * width] = e.fc.weight
                self.fc.bias[row:row + sizes[i]] = e.fc.bias
                row += sizes[i]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.blocks(f.repeat(1, self.k, 1, 1) if self.k > 1 else f)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1))


class FusedComposedModel(nn.Module):
    def __init__(self, plain: ComposedModel):
        super().__init__()
        lib = plain.library
        self.library = FusedLibrary(lib) if isinstance(lib, WRNLibrary) else lib
        self.experts = FusedExperts(list(plain.experts))
        for name in ("tasks", "labels", "class_ids", "group_sizes"):
            setattr(self, name, list(getattr(plain, name)))
        self.eval()

    label_groups = ComposedModel.label_groups
    predict = ComposedModel.predict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.library(x))


def fuse(plain: ComposedModel) -> FusedComposedModel:
    """The fused twin of a plain composed model (weights are copied; the plain model is untouched)."""
    with torch.no_grad():
        return FusedComposedModel(plain)
