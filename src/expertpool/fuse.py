"""Fused inference: the same composite model, rewritten for speed, numerically equal to the plain one.

* All chosen experts become ONE network: every convolution of the K experts becomes one grouped
  convolution (``groups=K``), every BatchNorm one BatchNorm over the K experts' channels side by side, and
  the K last layers one block-diagonal linear layer. The K first BatchNorms read the same input, so their
  K activated outputs are written in one pass from it, as ``[N, H, W, K, C]``.
* Every BatchNorm that directly follows a convolution (``bn2`` after ``conv1`` in each block, in the library
  and in the experts) is folded into that convolution.
* Activations are kept channels-last (NHWC) from end to end: oneDNN's convolutions, grouped ones above all,
  are several times faster on NHWC than on NCHW tensors, which make it reorder every input and output.
* ReLUs and residual additions run in place, so a block allocates three tensors instead of seven.
* A large batch runs as micro-batches of at most 128 images: every intermediate tensor then stays under
  glibc's 32 MiB mmap ceiling and is recycled from the heap instead of being mapped and page-faulted
  afresh on every call, which made the fused model's throughput swing by a third from call to call.
* A stem convolution over one input channel (Fashion-MNIST) is one matrix product over 3x3 patches, which
  oneDNN's one-channel path is about 3x slower than.

Measured on the cpu preset's Fashion-MNIST shapes by ``expertpool bench`` (``fused_speedup``).
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

CHANNELS_LAST = torch.channels_last


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


class PatchStem(nn.Module):
    """A convolution over ONE input channel as a matrix product over its unfolded patches (NHWC out)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert conv.in_channels == 1 and conv.groups == 1
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).t().contiguous())  # [k*k, out]
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        oh = (h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride).transpose(1, 2)
        y = patches @ self.weight if self.bias is None else torch.addmm(self.bias, patches.flatten(0, 1), self.weight)
        return y.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)  # NCHW view of NHWC memory


def _stem(conv: nn.Conv2d) -> nn.Module:
    if conv.in_channels == 1 and conv.groups == 1:
        return PatchStem(conv)
    return copy.deepcopy(conv).to(memory_format=CHANNELS_LAST)


class FusedBlock(nn.Module):
    """A ``BasicBlock`` in eval mode with ``bn2`` folded into ``conv1``; optionally K blocks grouped."""

    def __init__(self, blocks: list[BasicBlock]):
        super().__init__()
        self.bn1 = pack_bn([b.bn1 for b in blocks]).eval()
        self.conv1 = pack_conv([fold_conv_bn(b.conv1, b.bn2) for b in blocks])
        self.conv2 = pack_conv([b.conv2 for b in blocks])
        self.shortcut = None if blocks[0].convShortcut is None else pack_conv([b.convShortcut for b in blocks])
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """``a`` is ``relu(bn1(x))`` when the caller has it already."""
        a = self.bn1(x).relu_() if a is None else a
        out = self.conv2(self.conv1(a).relu_())
        return out.add_(x if self.shortcut is None else self.shortcut(a))


class FusedLibrary(nn.Module):
    def __init__(self, library: WRNLibrary):
        super().__init__()
        self.conv1 = _stem(library.conv1)
        self.blocks = nn.Sequential(*[FusedBlock([b]) for g in (library.block1, library.block2) for b in g.layer])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv1(x.contiguous(memory_format=CHANNELS_LAST)))


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
        # the first block's K BatchNorms all read the same input: kept as a [K, C] scale and shift, so that
        # their K outputs are written at once, never materializing K copies of the input
        scale, shift = zip(*[_bn_affine(e.block3.layer[0].bn1) for e in experts])
        self.register_buffer("scale0", torch.stack(scale))
        self.register_buffer("shift0", torch.stack(shift))
        self.blocks = nn.Sequential(*[FusedBlock([e.block3.layer[i] for e in experts])
                                      for i in range(len(experts[0].block3.layer))])
        self.bn = pack_bn([e.bn1 for e in experts]).eval()
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
        f = f.contiguous(memory_format=CHANNELS_LAST)
        first = self.blocks[0]
        if first.shortcut is None:  # the residual needs the K copies of the input after all
            h = first(f.repeat(1, self.k, 1, 1).contiguous(memory_format=CHANNELS_LAST))
        else:  # relu(bn1_k(f)) for every expert k, written NHWC as [N, H, W, K, C] in one pass
            nhwc = f.permute(0, 2, 3, 1).unsqueeze(3)
            a = torch.addcmul(self.shift0, nhwc, self.scale0).relu_().flatten(3).permute(0, 3, 1, 2)
            h = first(f, a)
        for block in self.blocks[1:]:
            h = block(h)
        return self.fc(self.bn(h).relu_().mean((2, 3)))


class FusedComposedModel(nn.Module):
    micro_batch = 128

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
        if x.shape[0] > self.micro_batch:
            return torch.cat([self.experts(self.library(part)) for part in x.split(self.micro_batch)])
        return self.experts(self.library(x))


def fuse(plain: ComposedModel) -> FusedComposedModel:
    """The fused twin of a plain composed model (weights are copied; the plain model is untouched)."""
    with torch.no_grad():
        return FusedComposedModel(plain)
