"""Joint extraction: K WideResNet experts trained in one pass as one grouped network.

All experts read the same input (the frozen library's features), so their K copies of every convolution
can run as one grouped convolution (``groups=K``) and their BatchNorms as one BatchNorm over their channels
side by side. BatchNorm statistics are per channel, the loss is the sum of the experts' own losses, and SGD
(momentum, weight decay) acts element by element, so each expert receives exactly the updates it would
get when trained alone on the same batches: joint training is K separate trainings computed together.

The first block's K BatchNorms all read the same input, so in training they see the same batch mean and
variance: the group computes those once and writes the K normalized, activated copies in one pass, never
materializing K copies of the input (``first_activation``); that block was most of a step's time.

``ExpertGroup(experts)`` packs K ``WRNExpert`` (same shape, any number of classes) and ``.unpack()`` gives
them back as K ``WRNExpert`` with the trained weights and statistics.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .nets import WRNExpert


def pack_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """K convolutions of one shape (no groups of their own) as one grouped convolution (``groups=K``)."""
    c = convs[0]
    k = len(convs)
    out = nn.Conv2d(c.in_channels * k, c.out_channels * k, c.kernel_size, c.stride, c.padding, groups=k,
                    bias=c.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in convs]))
        if c.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in convs]))
    return out


def pack_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    """K BatchNorms as one over their channels side by side (affine parameters and statistics)."""
    out = nn.BatchNorm2d(sum(b.num_features for b in bns), eps=bns[0].eps, momentum=bns[0].momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(out, name).copy_(torch.cat([getattr(b, name) for b in bns]))
        out.num_batches_tracked.copy_(bns[0].num_batches_tracked)
    return out


class _GroupBlock(nn.Module):
    def __init__(self, blocks: list):
        super().__init__()
        self.bn1 = pack_bn([b.bn1 for b in blocks])
        self.conv1 = pack_conv([b.conv1 for b in blocks])
        self.bn2 = pack_bn([b.bn2 for b in blocks])
        self.conv2 = pack_conv([b.conv2 for b in blocks])
        self.shortcut = None if blocks[0].convShortcut is None else pack_conv([b.convShortcut for b in blocks])

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """``a`` is ``relu(bn1(x))`` when the caller has it already."""
        a = F.relu(self.bn1(x)) if a is None else a
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class ExpertGroup(nn.Module):
    def __init__(self, experts: list[WRNExpert]):
        super().__init__()
        self.k = len(experts)
        self.configs = [(e.fc.out_features, e) for e in experts]  # kept to unpack into the same classes
        self.blocks = nn.Sequential(*[_GroupBlock([e.block3.layer[i] for e in experts])
                                      for i in range(len(experts[0].block3.layer))])
        self.bn = pack_bn([e.bn1 for e in experts])
        self.fcs = nn.ModuleList([nn.Linear(e.fc.in_features, e.fc.out_features) for e in experts])
        with torch.no_grad():
            for fc, e in zip(self.fcs, experts):
                fc.weight.copy_(e.fc.weight)
                fc.bias.copy_(e.fc.bias)
        self.width = experts[0].fc.in_features

    def first_activation(self, f: torch.Tensor) -> torch.Tensor:
        """``relu(bn1_k(f))`` of the first block for every expert k: ``[N, K*C, H, W]`` in NHWC memory.

        In training the K BatchNorms normalize by the batch statistics of ``f``, the same for all, and
        update their running statistics as ``nn.BatchNorm2d`` does; in eval each uses its own."""
        bn, k, c = self.blocks[0].bn1, self.k, f.shape[1]
        if self.training:
            x = f.float().permute(0, 2, 3, 1).reshape(-1, c)  # (torch.var_mean over dims 0, 2, 3 is 7x slower)
            mean = x.mean(0)
            var = (x - mean).square_().mean(0)
            with torch.no_grad():
                n = f.numel() // c
                bn.running_mean.lerp_(mean.repeat(k), bn.momentum)
                bn.running_var.lerp_(var.repeat(k) * (n / (n - 1)), bn.momentum)
                bn.num_batches_tracked += 1
            mean, var = mean.expand(k, c), var.expand(k, c)
        else:
            mean, var = bn.running_mean.view(k, c), bn.running_var.view(k, c)
        scale = bn.weight.view(k, c) * torch.rsqrt(var + bn.eps)
        shift = bn.bias.view(k, c) - mean * scale
        dtype = torch.get_autocast_dtype(f.device.type) if torch.is_autocast_enabled(f.device.type) else f.dtype
        nhwc = f.to(dtype).permute(0, 2, 3, 1).unsqueeze(3)  # [N, H, W, 1, C]
        a = torch.addcmul(shift.to(dtype), nhwc, scale.to(dtype)).relu_()  # [N, H, W, K, C]
        return a.flatten(3).permute(0, 3, 1, 2)

    def forward(self, f: torch.Tensor) -> list[torch.Tensor]:
        """The K experts' logits, as a list."""
        first = self.blocks[0]
        if self.k == 1:
            h = first(f)
        elif first.shortcut is None:  # the residual needs the K copies of the input after all
            h = first(f.repeat(1, self.k, 1, 1))
        else:
            h = first(f, self.first_activation(f))
        for block in self.blocks[1:]:
            h = block(h)
        pooled = F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1)
        return [fc(p) for fc, p in zip(self.fcs, pooled.split(self.width, dim=1))]

    @torch.no_grad()
    def unpack(self) -> list[WRNExpert]:
        """The K trained experts as separate ``WRNExpert`` modules (weights and BN statistics copied)."""
        state = self.state_dict()
        out = []
        for i, (_, template) in enumerate(self.configs):
            expert_state = {}
            for key, value in template.state_dict().items():
                if key.startswith("fc."):
                    expert_state[key] = state[f"fcs.{i}.{key[3:]}"].clone()
                    continue
                src = self._source_key(key)
                v = state[src]
                if key.endswith("num_batches_tracked"):
                    expert_state[key] = v.clone()
                else:
                    n = value.shape[0]
                    expert_state[key] = v[i * n:(i + 1) * n].clone()
            template.load_state_dict(expert_state)
            out.append(template)
        return out

    @staticmethod
    def _source_key(key: str) -> str:
        # block3.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}.* -> blocks.{j}.{bn1,conv1,bn2,conv2,shortcut}.*
        if key.startswith("block3.layer."):
            _, _, j, rest = key.split(".", 3)
            return f"blocks.{j}.{rest.replace('convShortcut', 'shortcut')}"
        return key.replace("bn1.", "bn.", 1)  # the head's BatchNorm
