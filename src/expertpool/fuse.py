"""Fused inference: the same composite model, rewritten for speed, numerically equal to the plain one.

A plain composed model runs 7 small layers per block in PyTorch's default NCHW layout. The fused one:

* **folds** every BatchNorm that directly follows a convolution (``bn2`` after ``conv1`` in each block) into
  that convolution, and keeps every other BatchNorm as a per-channel scale and shift;
* keeps activations **channels-last** (NHWC) from end to end: oneDNN's convolutions are much faster on NHWC
  tensors than on NCHW ones, which it must reorder on every call;
* runs each block as **three passes**: ``a = relu(bn1(x))``, ``h = relu(conv1(a))`` and ``x += conv2(h)``,
  the ReLU and the residual addition done inside oneDNN's convolution as post-ops
  (``torch.ops.mkldnn._convolution_pointwise``, the kernels ``torch.compile`` itself uses on CPU) instead of
  as separate passes over memory (on another device, or without oneDNN, they are plain PyTorch ops);
* runs the experts either as **one grouped network** (every convolution of the K experts one grouped
  convolution, ``groups=K``, and their K last layers one block-diagonal linear layer) or as K separately
  fused experts: which is faster depends on the CPU (oneDNN's grouped kernels are slow for 16-32 channels
  per group on some), so ``fuse`` measures both on a probe batch and keeps the faster (``experts="auto"``);
* computes a one-channel stem (Fashion-MNIST) with oneDNN or as a matrix product over 3x3 patches, also
  chosen by measurement (which is faster differs between CPUs, by 3x either way);
* splits a large batch into micro-batches of ``micro_batch`` images, so each layer's tensors stay in cache.

Convolutions are most of the time of both models, and the library's run near this CPU's matrix-multiply
peak in both, so what oneDNN can gain is bounded. A second **engine** is therefore a candidate too: the
composed model's ONNX graph (as ``export`` assembles it) run by ONNX Runtime, whose CPU provider folds the
BatchNorms, fuses ReLUs and additions into its own blocked-layout convolution kernels, and is faster than
oneDNN on some CPUs (the AVX2 machines here, by ~20 %). ``fuse`` times both engines on the probe and keeps
the faster (``engine="auto"``), but only an ONNX graph whose outputs are within ``TOLERANCE`` of the plain
model's on the probe; inputs that ONNX Runtime cannot take as they are (another device, dtype) always go
through the PyTorch modules, which every fused model keeps (``expertpool bench`` reports both engines).
Only WideResNet parts (``WRNLibrary``, ``WRNExpert`` of one shape) are fused; ``fuse`` refuses others with a
ValueError. Plain: ``ComposedModel``; fused: ``FusedComposedModel``, same ``labels`` / ``label_groups`` /
``class_ids``.
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import nn
import torch.nn.functional as F

from .compose import ComposedModel
from .evaluate import alternating_times
from .joint import pack_bn, pack_conv
from .nets import BasicBlock, WRNExpert, WRNLibrary

CHANNELS_LAST = torch.channels_last
TOLERANCE = 1e-5  # max abs difference allowed between a fused model's logits and the plain model's


# --------------------------------------------------------------------------- folding and fused kernels
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


def _post_ops(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolutions serve ``x`` (a float32 CPU tensor, with oneDNN built in)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_relu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``relu(conv(x))``, the ReLU applied by the convolution as it writes its output."""
    if _post_ops(x):
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *_conv_args(conv), "relu", [], "")
    return conv(x).relu_()


def conv_add_(out: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``out += conv(x)`` in place, the addition done by the convolution as it writes its output."""
    if _post_ops(x) and out.is_contiguous(memory_format=CHANNELS_LAST):
        return torch.ops.mkldnn._convolution_pointwise_.binary(out, x, conv.weight, conv.bias, *_conv_args(conv),
                                                               "add", 1.0, None, [], None)
    return out.add_(conv(x))


class Affine(nn.Module):
    """An eval-mode BatchNorm as a per-channel ``scale * x + shift``, optionally followed by a ReLU."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone())

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> "Affine":
        return cls(*_bn_affine(bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale).relu_()


# --------------------------------------------------------------------------- stems
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


class ConvStem(nn.Module):
    """The stem convolution as it is, on channels-last memory."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = copy.deepcopy(conv).to(memory_format=CHANNELS_LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.contiguous(memory_format=CHANNELS_LAST))


# --------------------------------------------------------------------------- blocks, library, experts
class FusedBlock(nn.Module):
    """A ``BasicBlock`` in eval mode, in three passes; optionally K blocks side by side (grouped)."""

    def __init__(self, blocks: list[BasicBlock]):
        super().__init__()
        self.act = Affine.of(pack_bn([b.bn1 for b in blocks]))
        self.conv1 = pack_conv([fold_conv_bn(b.conv1, b.bn2) for b in blocks])
        self.conv2 = pack_conv([b.conv2 for b in blocks])
        self.shortcut = None if blocks[0].convShortcut is None else pack_conv([b.convShortcut for b in blocks])
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """``a`` is ``relu(bn1(x))`` when the caller has it already. Without a shortcut convolution the
        block adds its output to ``x`` in place: ``x`` must be a tensor of the caller's own."""
        a = self.act(x) if a is None else a
        h = conv_relu(a, self.conv1)
        return conv_add_(x if self.shortcut is None else self.shortcut(a), h, self.conv2)


class FusedLibrary(nn.Module):
    def __init__(self, library: WRNLibrary, stem: str = "conv"):
        super().__init__()
        if stem == "patch" and library.conv1.in_channels != 1:
            raise ValueError("a patch stem needs a one-channel input")
        self.conv1 = PatchStem(library.conv1) if stem == "patch" else ConvStem(library.conv1)
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
        self.act = Affine.of(pack_bn([e.bn1 for e in experts]))
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

    def first_activation(self, f: torch.Tensor) -> torch.Tensor:
        """``relu(bn1_k(f))`` for every expert k, written NHWC as ``[N, H, W, K, C]`` in one pass: the K
        BatchNorms all read the same input, so K copies of it are never made."""
        act = self.blocks[0].act
        scale, shift = act.scale.view(self.k, -1), act.shift.view(self.k, -1)
        nhwc = f.permute(0, 2, 3, 1).unsqueeze(3)
        return torch.addcmul(shift, nhwc, scale).relu_().flatten(3).permute(0, 3, 1, 2)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.contiguous(memory_format=CHANNELS_LAST)
        first = self.blocks[0]
        if first.shortcut is None:  # the residual needs the K copies of the input after all
            h = first(f.repeat(1, self.k, 1, 1).contiguous(memory_format=CHANNELS_LAST))
        else:  # with a shortcut convolution the block adds into its output, never into f
            h = first(f, self.first_activation(f) if self.k > 1 else None)
        for block in self.blocks[1:]:
            h = block(h)
        return self.fc(self.act(h).mean((2, 3)))


class SeparateExperts(nn.Module):
    """K experts, each fused on its own (``FusedExperts`` of one), their logits side by side."""

    def __init__(self, experts: list[WRNExpert]):
        super().__init__()
        self.experts = nn.ModuleList([FusedExperts([e]) for e in experts])

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = f.contiguous(memory_format=CHANNELS_LAST)
        return torch.cat([e(f) for e in self.experts], dim=1)


# --------------------------------------------------------------------------- the ONNX Runtime engine
class OnnxRuntimeGraph:
    """A composed model's ONNX graph run by ONNX Runtime on the CPU, called like a module on float32 CPU
    tensors. Keeps the graph's bytes, so copies and pickles rebuild their session instead of sharing one."""

    def __init__(self, blob: bytes, threads: int):
        self.blob, self.threads = blob, threads
        self._start()

    def _start(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        # no busy-waiting between runs: the process's PyTorch work gets the cores back at once
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.blob, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.detach().contiguous().numpy()})[0])

    def __getstate__(self) -> dict:
        return {"blob": self.blob, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start()


# --------------------------------------------------------------------------- the fused composed model
class FusedComposedModel(nn.Module):
    def __init__(self, plain: ComposedModel, stem: str = "conv", experts: str = "separate", micro_batch: int = 256):
        super().__init__()
        lib = plain.library
        self.library = FusedLibrary(lib, stem) if isinstance(lib, WRNLibrary) else lib
        parts = list(plain.experts)
        self.experts = FusedExperts(parts) if experts == "grouped" else SeparateExperts(parts)
        self.micro_batch = micro_batch
        self.graph: OnnxRuntimeGraph | None = None  # the ONNX Runtime engine, when ``fuse`` chooses it
        self.choices = {"stem": stem if isinstance(lib, WRNLibrary) else None, "experts": experts, "engine": "torch"}
        for name in ("tasks", "labels", "class_ids", "group_sizes"):
            setattr(self, name, list(getattr(plain, name)))
        self.eval()

    label_groups = ComposedModel.label_groups
    predict = ComposedModel.predict

    def _in_micro_batches(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.micro_batch:
            return torch.cat([fn(part) for part in x.split(self.micro_batch)])
        return fn(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The PyTorch engine: fused library and experts, in micro-batches."""
        return self._in_micro_batches(lambda part: self.experts(self.library(part)), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._in_micro_batches(self.graph, x)
        return self.forward_torch(x)


def probe_batch(input_shape) -> torch.Tensor:
    """The batch ``fuse`` times its candidates on: 128 seeded random inputs (the global RNG is untouched)."""
    return torch.randn(128, *input_shape, generator=torch.Generator().manual_seed(0))


def _faster(candidates: dict, x: torch.Tensor, rounds: int = 5) -> str:
    """The name of the fastest of ``candidates`` (name -> callable) on ``x``: ``rounds`` rounds in which each
    runs once untimed and once timed, in turns so that all see the same machine load; the median round
    counts. (The best time instead picked whichever candidate met a quiet moment of a noisy machine, and a
    fresh ONNX Runtime session needs a few runs before it is at its speed.)"""
    times = alternating_times({name: (lambda fn=fn: fn(x)) for name, fn in candidates.items()}, rounds)
    typical = {name: statistics.median(t) for name, t in times.items()}
    return min(typical, key=typical.get)


def _onnx_graph(plain: ComposedModel, probe: torch.Tensor) -> OnnxRuntimeGraph | None:
    """The ONNX Runtime engine for ``plain``, or None where it cannot serve: ONNX Runtime missing, a model
    that does not export, or outputs on ``probe`` further than ``TOLERANCE`` from the plain model's."""
    try:
        from .export import shared_exporter

        spec = {"shape": list(probe.shape[1:]), "mean": [0.0], "std": [1.0]}  # metadata only
        graph = OnnxRuntimeGraph(shared_exporter().onnx_bytes(plain, spec), torch.get_num_threads())
        if (graph(probe) - plain(probe)).abs().max().item() < TOLERANCE:
            return graph
    except Exception:  # noqa: BLE001  (any failure only means this engine is not a candidate)
        pass
    return None


def fuse(plain: ComposedModel, probe: torch.Tensor | None = None, stem: str = "auto", experts: str = "auto",
         micro_batch: int = 256, engine: str = "auto") -> FusedComposedModel:
    """The fused twin of a plain composed model (weights are copied; the plain model is untouched).

    ``stem`` (``conv`` or ``patch``, for a one-channel input), ``experts`` (``grouped`` or ``separate``) and
    ``engine`` (``torch`` or ``onnxruntime``) say how to compute it; ``auto`` times the candidates on
    ``probe`` (a batch of inputs, e.g. 128 random images; ``Pool.compose(..., fused=True)`` passes one) and
    keeps the faster, which takes a second or two once. Without a probe, ``auto`` means
    ``conv``, ``separate`` and ``torch``. ``fused.choices`` says what was chosen. All candidates compute
    the same function; ``engine="onnxruntime"`` needs a probe (to check the graph against the plain model)
    and falls back to ``torch`` where that graph cannot serve."""
    if stem not in ("auto", "conv", "patch") or experts not in ("auto", "grouped", "separate") \
            or engine not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"unknown stem {stem!r}, experts {experts!r} or engine {engine!r}")
    lib = plain.library
    one_channel = isinstance(lib, WRNLibrary) and lib.conv1.in_channels == 1
    with torch.no_grad():
        if stem == "auto":
            stem = "conv"
            if one_channel and probe is not None:
                stem = _faster({"conv": ConvStem(lib.conv1), "patch": PatchStem(lib.conv1)}, probe)
        if experts == "auto":
            experts = "separate"
            if probe is not None and len(plain.experts) > 1 and all(isinstance(e, WRNExpert) for e in plain.experts):
                features = FusedLibrary(lib, stem)(probe) if isinstance(lib, WRNLibrary) else lib(probe)
                parts = list(plain.experts)
                experts = _faster({"grouped": FusedExperts(parts), "separate": SeparateExperts(parts)}, features)
        fused = FusedComposedModel(plain, stem, experts, micro_batch)
        if engine != "torch" and probe is not None:
            graph = _onnx_graph(plain, probe)
            if graph is not None and (engine == "onnxruntime" or
                                      _faster({"torch": fused.forward_torch, "onnxruntime": graph}, probe) == "onnxruntime"):
                fused.graph = graph
                fused.choices["engine"] = "onnxruntime"
        return fused
