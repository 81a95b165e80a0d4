"""Networks, split the way Pool of Experts uses them.

A WideResNet is cut in two, like timm's ``forward_features`` / ``forward_head``:

* the **library**: stem conv + block groups 1 and 2 (shared by every expert),
* the **expert**: block group 3 + BN + ReLU + global average pool + FC (one per primitive task).

The oracle and the library's KD student are the two parts put back together (``Classifier``).
Parameter names follow the paper's research code (``conv1``, ``block1.layer.0.bn1``,
``block2.layer.0.convShortcut``, ``block3``, ``bn1``, ``fc``), so its checkpoints load as they are.

Every network is described by a small JSON-able dict (``{"arch": ..., ...}``) and built by ``create``;
the pool stores that dict next to the weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- layers that can skip their init
_INIT = contextvars.ContextVar("expertpool_random_init", default=True)


@contextlib.contextmanager
def weights_to_be_loaded():
    """Build networks without random initialisation, because their weights are loaded right after (and
    ``load_state_dict`` is strict, so every tensor is overwritten): construction takes about 40 % less time,
    which is most of composing from a cold pool. Context-local, so other threads still build as usual."""
    token = _INIT.set(False)
    try:
        yield
    finally:
        _INIT.reset(token)


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        if _INIT.get():
            super().reset_parameters()


class BatchNorm2d(nn.BatchNorm2d):
    def reset_parameters(self) -> None:
        if _INIT.get():
            super().reset_parameters()


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        if _INIT.get():
            super().reset_parameters()


# --------------------------------------------------------------------------- WideResNet pieces
class BasicBlock(nn.Module):
    """Pre-activation WideResNet block (BN-ReLU-conv-BN-ReLU-conv, with a 1x1 shortcut on shape change)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(out_planes)
        self.conv2 = Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class BlockGroup(nn.Module):
    """``n`` blocks; the first one changes width and applies the stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _blocks_per_group(depth: int) -> int:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    return (depth - 4) // 6


def init_weights(module: nn.Module) -> None:
    """The research code's init: conv ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 bias 0, linear bias 0."""
    if not _INIT.get():
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class WRNLibrary(nn.Module):
    """Front of a WideResNet: stem conv, block group 1 and block group 2 (no final BN)."""

    def __init__(self, depth: int = 16, width: float = 1, in_channels: int = 3, first_stride: int = 1):
        super().__init__()
        n = _blocks_per_group(depth)
        c1, c2 = int(16 * width), int(32 * width)
        self.conv1 = Conv2d(in_channels, 16, 3, first_stride, 1, bias=False)
        self.block1 = BlockGroup(n, 16, c1, 1)
        self.block2 = BlockGroup(n, c1, c2, 2)
        self.out_channels = c2
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.conv1(x)))


class WRNExpert(nn.Module):
    """Back of a WideResNet: block group 3 (stride 2), BN, ReLU, global average pool, FC."""

    def __init__(self, num_classes: int, in_channels: int = 32, depth: int = 16, width: float = 0.25):
        super().__init__()
        n = _blocks_per_group(depth)
        c3 = int(64 * width)
        self.block3 = BlockGroup(n, in_channels, c3, 2)
        self.bn1 = BatchNorm2d(c3)
        self.fc = Linear(c3, num_classes)
        init_weights(self)

    def forward_features(self, f: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.bn1(self.block3(f))), 1).flatten(1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(f))


# --------------------------------------------------------------------------- MobileNetV2 pieces
class MobileNetLibrary(nn.Module):
    """torchvision's MobileNetV2 feature stack without its last 1x1 conv (320 channels out)."""

    def __init__(self, in_channels: int = 3, weights_file: str | None = None):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        if weights_file:
            net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        if in_channels != 3:
            old = net.features[0][0]
            net.features[0][0] = Conv2d(in_channels, old.out_channels, 3, 2, 1, bias=False)
        self.features = net.features[:-1]
        self.out_channels = 320

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MobileNetExpert(nn.Module):
    """1x1 conv 320->80 + BN + ReLU6 + global pool + dropout 0.2 + FC (the paper's ImageNet expert)."""

    def __init__(self, num_classes: int, in_channels: int = 320, hidden: int = 80, dropout: float = 0.2):
        super().__init__()
        self.conv = Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = BatchNorm2d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = Linear(hidden, num_classes)
        init_weights(self)

    def forward_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.adaptive_avg_pool2d(F.relu6(self.bn(self.conv(f))), 1).flatten(1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(f))


# --------------------------------------------------------------------------- whole classifiers
class Classifier(nn.Module):
    """A library followed by one head: the oracle, the library's KD student, and the baselines' models."""

    def __init__(self, library: nn.Module, head: nn.Module):
        super().__init__()
        self.library, self.head = library, head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.library(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.library(x))


def _wrn(num_classes: int, depth: int, width: float, in_channels: int = 3, first_stride: int = 1) -> Classifier:
    """A whole WideResNet-depth-width (used for oracles and students)."""
    lib = WRNLibrary(depth, width, in_channels, first_stride)
    return Classifier(lib, WRNExpert(num_classes, lib.out_channels, depth, width))


def _torchvision(num_classes: int, name: str, in_channels: int = 3, weights_file: str | None = None) -> nn.Module:
    """Any torchvision classifier by name (an oracle), weights from a local file when given."""
    import torchvision

    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights_file:
        net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    return net


# --------------------------------------------------------------------------- registry
REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "wrn": _wrn,
    "wrn_library": WRNLibrary,
    "wrn_expert": WRNExpert,
    "mobilenet_v2_library": MobileNetLibrary,
    "mobilenet_v2_expert": MobileNetExpert,
    "torchvision": _torchvision,
}


def create(config: dict[str, Any]) -> nn.Module:
    """Build a network from its JSON-able config, e.g. ``{"arch": "wrn_expert", "num_classes": 5}``."""
    kwargs = dict(config)
    arch = kwargs.pop("arch", None)
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch](**kwargs)


# --------------------------------------------------------------------------- networks from stored weights
@functools.lru_cache(maxsize=32)
def _template(config_json: str) -> tuple[nn.Module, dict[str, tuple]]:
    """The module tree of a config in eval mode, with shape-only (meta) tensors, and the name, shape and
    dtype of each of its parameters and buffers: built once per architecture and process, never handed
    out; ``instantiate`` copies its structure."""
    with weights_to_be_loaded():
        net = create(json.loads(config_json)).eval().to("meta")
    tensors = {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers(remove_duplicate=False))}
    return net, {k: (v.shape, v.dtype) for k, v in tensors.items()}


def _with_tensors(template: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A copy of ``template``'s module tree (every module a new object of the same class with copies of its
    attribute containers, so a hook registered on one copy stays on it) whose parameters and buffers are
    ``state``'s tensors."""
    new = object.__new__(type(template))
    attrs = {k: (v.copy() if isinstance(v, (dict, set, list)) else v) for k, v in template.__dict__.items()}
    attrs["_parameters"] = {k: None if p is None else nn.Parameter(state[prefix + k], p.requires_grad)
                            for k, p in template._parameters.items()}
    attrs["_buffers"] = {k: None if b is None else state[prefix + k] for k, b in template._buffers.items()}
    attrs["_modules"] = {k: None if m is None else _with_tensors(m, state, f"{prefix}{k}.")
                         for k, m in template._modules.items()}
    new.__dict__ = attrs
    return new


def instantiate(config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The network of ``config`` with the weights ``state`` (a complete state dict), in eval mode.

    The same as ``create(config)`` then ``load_state_dict(state)``, but several times faster: running a
    network's constructor (thousands of ``nn.Module.__setattr__`` calls) and copying every tensor in were
    most of the time of composing from a cold pool. Here the module tree is built once per architecture and
    process (``_template``, weightless) and copied, and copies of ``state``'s tensors (so they own writable
    memory) become its parameters and buffers. A state dict that does not fit the template exactly (names,
    shapes) goes the ordinary way, and so gets ``load_state_dict``'s own error."""
    template, expected = _template(json.dumps(config, sort_keys=True))
    if expected.keys() != state.keys() or any(shape != state[k].shape for k, (shape, _) in expected.items()):
        with weights_to_be_loaded():
            net = create(config)
        net.load_state_dict(state)
        return net.eval()
    return _with_tensors(template, {k: state[k].to(dtype, copy=True) for k, (_, dtype) in expected.items()})


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
