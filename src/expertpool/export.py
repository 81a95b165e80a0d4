"""Deployable exports of a composed model: ONNX, safetensors, ``torch.export`` (.pt2).

    info = export(model, "pets.onnx", pool.input_spec)      # {"path", "format", "sha256", "bytes"}
    blob = Exporter().to_bytes(model, "onnx", pool.input_spec)

* **ONNX**: input ``input`` [batch, C, H, W] (dynamic batch axis), output ``logits`` [batch, n];
  ``metadata_props`` hold JSON: ``labels``, ``label_groups``, ``tasks``, ``class_ids``, ``input`` (shape,
  mean, std). Every export is run in ONNX Runtime and compared with PyTorch on the same random batch; a
  max abs difference of 1e-4 or more raises ``ExportMismatch``.
  Composed models are *assembled* (train-free, like the composition itself): the library and each
  expert's feature stack are exported once per architecture with torch's exporter (``dynamo=True``) as
  templates, their weights are filled in from the modules, each expert's ``fc`` becomes a ``Gemm`` and the
  outputs a ``Concat``. That takes milliseconds instead of seconds; any model that does not have this
  shape (or whose assembled graph fails the check) is exported whole with ``torch.onnx.export``.
* **safetensors**: the state dict, and in the header (JSON strings) the labels, groups, tasks, input spec
  and the composition (library and expert configs) so that ``load_safetensors`` can rebuild the model.
* **.pt2**: ``torch.export`` program with a dynamic batch axis, saved with ``torch.export.save``; the
  same metadata rides along as the extra file ``expertpool.json``.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError

FORMATS = {".onnx": "onnx", ".safetensors": "safetensors", ".pt2": "torch"}
SUFFIX = {v: k for k, v in FORMATS.items()}
MEDIA_TYPES = {"onnx": "application/octet-stream", "safetensors": "application/octet-stream",
               "torch": "application/zip"}
TOLERANCE = 1e-4
ARTIFACT_FORMAT = "expertpool-composed"


class ExportMismatch(RuntimeError):
    """An exported model whose outputs differ from PyTorch's."""


# --------------------------------------------------------------------------- metadata and configs
def network_config(module: nn.Module) -> dict | None:
    """The ``nets.create`` config that rebuilds ``module`` (WRN and MobileNetV2 parts), or None."""
    from .nets import MobileNetExpert, MobileNetLibrary, WRNExpert, WRNLibrary

    if getattr(module, "config", None):
        return dict(module.config)
    if isinstance(module, WRNLibrary):
        n = len(module.block1.layer)
        return {"arch": "wrn_library", "depth": 6 * n + 4, "width": module.block1.layer[0].conv1.out_channels / 16,
                "in_channels": module.conv1.in_channels, "first_stride": module.conv1.stride[0]}
    if isinstance(module, WRNExpert):
        n = len(module.block3.layer)
        first = module.block3.layer[0].conv1
        return {"arch": "wrn_expert", "num_classes": module.fc.out_features, "in_channels": first.in_channels,
                "depth": 6 * n + 4, "width": first.out_channels / 64}
    if isinstance(module, MobileNetLibrary):
        return {"arch": "mobilenet_v2_library", "in_channels": module.features[0][0].in_channels}
    if isinstance(module, MobileNetExpert):
        return {"arch": "mobilenet_v2_expert", "num_classes": module.fc.out_features,
                "in_channels": module.conv.in_channels, "hidden": module.conv.out_channels,
                "dropout": module.dropout.p}
    return None


def model_metadata(model: nn.Module, input_spec: dict) -> dict:
    """JSON-able description of a composed model (everything an exported file carries besides weights)."""
    from . import __version__

    meta = {"format": ARTIFACT_FORMAT, "software_version": __version__,
            "labels": list(model.labels), "label_groups": dict(model.label_groups), "tasks": list(model.tasks),
            "class_ids": list(model.class_ids), "group_sizes": list(model.group_sizes),
            "input": {"shape": list(input_spec["shape"]), "mean": list(input_spec["mean"]),
                      "std": list(input_spec["std"])},
            "input_name": "input", "output_name": "logits"}
    library, experts = getattr(model, "library", None), getattr(model, "experts", None)
    if library is not None and experts is not None:
        meta["composition"] = {"library": network_config(library),
                               "experts": [network_config(e) for e in experts]}
    return meta


def _example(input_spec: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_spec["shape"], generator=g)


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- ONNX
class _Features(nn.Module):
    """An expert without its last layer (the part exported as an ONNX template)."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert = expert

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.expert.forward_features(f)


def _torch_onnx(module: nn.Module, example: torch.Tensor, optimize: bool) -> "onnx.ModelProto":  # noqa: F821
    """torch's exporter (torch.export based), dynamic batch axis, input ``input``, output ``output``."""
    import logging

    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, optimize=optimize,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    input_names=["input"], output_names=["output"])
    return program.model_proto


def _signature(module: nn.Module, state: dict, example: torch.Tensor) -> tuple:
    return (type(module).__name__, tuple(example.shape[1:]),
            tuple((k, tuple(v.shape)) for k, v in state.items() if not k.startswith("expert.fc.")))


def fold_all_but_weights(model: "onnx.ModelProto", weights: set[str]) -> "onnx.ModelProto":  # noqa: F821
    """``model`` with everything that does not depend on the initializers named in ``weights`` folded away
    (onnxscript's optimizer), those initializers kept as they are, by name.

    torch's exporter, unoptimized, builds a zero bias for every bias-free convolution out of Shape / Expand /
    CastLike nodes and tags every node with its Python stack: three times the nodes and twice the bytes of
    the real network, which ONNX Runtime then loads and runs. Optimized, it folds each BatchNorm into the
    convolution before it, so the weights could no longer be refilled by name. Presented as graph *inputs*
    while the optimizer runs, the weights cannot be folded into anything; all else that can be, is."""
    import onnx
    from onnx import helper
    from onnxscript import optimizer

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    held = [i for i in g.initializer if i.name in weights]
    rest = [i for i in g.initializer if i.name not in weights]
    del g.initializer[:]
    g.initializer.extend(rest)
    g.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in held)
    out = optimizer.optimize(m)
    g = out.graph
    inputs = [v for v in g.input if v.name not in weights]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(held)
    for node in g.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return out


@dataclass
class _Template:
    """One part's ONNX graph, names prefixed, ready to be filled with a module's weights."""

    nodes: list  # NodeProto
    constants: list  # initializers that do not come from the state dict (shapes of reshapes, zero biases)
    weights: list[tuple[str, str]]  # (state-dict key, initializer name)
    input: str
    output: str
    opsets: dict[str, int]
    ir_version: int
    out_shape: tuple


class Exporter:
    """Builds export bytes; keeps ONNX templates (one per part architecture and position) in bounded caches."""

    def __init__(self, max_templates: int = 32):
        self._bases: collections.OrderedDict = collections.OrderedDict()  # signature -> (proto, out shape)
        self._prefixed: collections.OrderedDict = collections.OrderedDict()  # (signature, prefix) -> _Template
        self._max = max_templates
        self._lock = threading.RLock()  # torch.export is not meant to run in several threads at once

    @staticmethod
    def _remember(cache: collections.OrderedDict, key, make, limit: int):
        if key not in cache:
            cache[key] = make()
            while len(cache) > limit:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    # ----------------------------------------------------------- ONNX parts
    def _template(self, module: nn.Module, state: dict, example: torch.Tensor, prefix: str) -> _Template:
        from onnx import compose

        key = _signature(module, state, example)

        def base():
            with torch.no_grad():
                out_shape = tuple(module(example).shape[1:])
            proto = _torch_onnx(module, example, optimize=False)  # initializers keep their state-dict names
            return fold_all_but_weights(proto, set(state)), out_shape

        def prefixed():
            proto, out_shape = self._remember(self._bases, key, base, self._max)
            part = compose.add_prefix(proto, prefix)
            weights = [(i.name[len(prefix):], i.name) for i in part.graph.initializer if i.name[len(prefix):] in state]
            named = {n for _, n in weights}
            return _Template(list(part.graph.node), [i for i in part.graph.initializer if i.name not in named],
                             weights, part.graph.input[0].name, part.graph.output[0].name,
                             {o.domain: o.version for o in part.opset_import}, part.ir_version, out_shape)

        with self._lock:
            return self._remember(self._prefixed, (key, prefix), prefixed, 8 * self._max)

    @staticmethod
    def _weights(state: dict, template: _Template) -> list:
        from onnx import numpy_helper

        return [numpy_helper.from_array(np.ascontiguousarray(state[k].detach().cpu().numpy()), name)
                for k, name in template.weights]

    def _assemble(self, model: nn.Module, spec: dict):
        """ONNX of library + experts' feature stacks + one Gemm per expert + Concat, or None if not that shape."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        library, experts = getattr(model, "library", None), getattr(model, "experts", None)
        if library is None or experts is None or not len(experts) or any(
                not hasattr(e, "forward_features") or not isinstance(getattr(e, "fc", None), nn.Linear)
                for e in experts):
            return None
        state = library.state_dict()
        lib = self._template(library, state, _example(spec), "lib/")
        feats = torch.zeros(2, *lib.out_shape)
        nodes = [helper.make_node("Identity", ["input"], [lib.input]), *lib.nodes]
        inits = [*lib.constants, *self._weights(state, lib)]
        opsets, outs = dict(lib.opsets), []
        for i, expert in enumerate(experts):
            features = _Features(expert)
            state = features.state_dict()
            part = self._template(features, state, feats, f"e{i}/")
            nodes += [helper.make_node("Identity", [lib.output], [part.input]), *part.nodes]
            inits += [*part.constants, *self._weights(state, part)]
            for domain, version in part.opsets.items():
                opsets[domain] = max(opsets.get(domain, 0), version)
            w, b = expert.fc.weight.detach().cpu().numpy(), expert.fc.bias
            b = (b.detach().cpu().numpy() if b is not None else np.zeros(w.shape[0], dtype=np.float32))
            inits += [numpy_helper.from_array(np.ascontiguousarray(w), f"e{i}/fc.weight"),
                      numpy_helper.from_array(np.ascontiguousarray(b), f"e{i}/fc.bias")]
            nodes.append(helper.make_node("Gemm", [part.output, f"e{i}/fc.weight", f"e{i}/fc.bias"],
                                          [f"e{i}/logits"], transB=1))
            outs.append(f"e{i}/logits")
        nodes.append(helper.make_node("Concat", outs, ["logits"], axis=1))
        c, h, w_ = spec["shape"]
        graph = helper.make_graph(
            nodes, "expertpool_composed",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w_])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(model.labels)])],
            initializer=inits)
        out = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                producer_name="expertpool")
        out.ir_version = lib.ir_version
        onnx.checker.check_model(out)
        return out

    def _whole(self, model: nn.Module, spec: dict):
        with self._lock:
            proto = _torch_onnx(model, _example(spec), optimize=True)
        proto.graph.input[0].name = "input"  # already named so; make sure of the output name too
        old = proto.graph.output[0].name
        if old != "logits":
            for n in proto.graph.node:
                n.output[:] = ["logits" if o == old else o for o in n.output]
            proto.graph.output[0].name = "logits"
        return proto

    def onnx_bytes(self, model: nn.Module, spec: dict) -> bytes:
        """Verified ONNX bytes of ``model`` (assembled when possible, else exported whole)."""
        from onnx import helper

        model = model.eval()
        meta = {k: json.dumps(v) for k, v in model_metadata(model, spec).items()}
        proto = self._assemble(model, spec)
        if proto is not None:
            helper.set_model_props(proto, meta)
            blob = proto.SerializeToString()
            try:
                verify_onnx(blob, model, spec)
                return blob
            except ExportMismatch:
                pass  # fall back to torch's exporter on the whole model
        proto = self._whole(model, spec)
        del proto.metadata_props[:]
        helper.set_model_props(proto, meta)
        blob = proto.SerializeToString()
        verify_onnx(blob, model, spec)
        return blob

    # ----------------------------------------------------------- other formats
    def safetensors_bytes(self, model: nn.Module, spec: dict) -> bytes:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        return save(tensors, metadata={k: json.dumps(v) for k, v in model_metadata(model, spec).items()})

    def torch_bytes(self, model: nn.Module, spec: dict) -> bytes:
        model = model.eval()
        with self._lock, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (_example(spec),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
            buf = io.BytesIO()
            torch.export.save(program, buf, extra_files={"expertpool.json": json.dumps(model_metadata(model, spec))})
        return buf.getvalue()

    def to_bytes(self, model: nn.Module, fmt: str, spec: dict) -> bytes:
        if fmt == "onnx":
            return self.onnx_bytes(model, spec)
        if fmt == "safetensors":
            return self.safetensors_bytes(model, spec)
        if fmt == "torch":
            return self.torch_bytes(model, spec)
        raise UserError(f"unknown export format {fmt!r}; valid: onnx, safetensors, torch")


@functools.lru_cache(maxsize=1)
def shared_exporter() -> Exporter:
    """The process's exporter for callers that keep none of their own (``fuse``): its part templates make
    every export after the first of an architecture take milliseconds."""
    return Exporter()


def verify_onnx(blob: bytes, model: nn.Module, spec: dict, tolerance: float = TOLERANCE) -> float:
    """Run ``blob`` in ONNX Runtime on a random batch of 2; raise ``ExportMismatch`` unless it matches PyTorch."""
    import onnxruntime as ort

    x = _example(spec, batch=2, seed=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a check, not a deployment
    opts.log_severity_level = 3
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).cpu().numpy()
    if got.shape != want.shape:
        raise ExportMismatch(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
    diff = float(np.abs(got - want).max())
    if not diff < tolerance:
        raise ExportMismatch(f"ONNX output differs from PyTorch by {diff:.3g} (tolerance {tolerance})")
    return diff


def export(model: nn.Module, path: str | os.PathLike, input_spec: dict, exporter: Exporter | None = None) -> dict:
    """Write ``model`` to ``path`` (.onnx, .safetensors or .pt2); returns {path, format, sha256, bytes}."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot export to {path.name!r}: the file name must end in .onnx, .safetensors or .pt2")
    if path.parent and not path.parent.is_dir():
        raise UserError(f"cannot export to {path}: folder {path.parent} does not exist")
    blob = (exporter or Exporter()).to_bytes(model, fmt, input_spec)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return {"path": str(path), "format": fmt, "sha256": _digest(blob), "bytes": len(blob)}


# --------------------------------------------------------------------------- reading exports back
def read_onnx_metadata(source: str | os.PathLike | bytes) -> dict:
    import onnx

    proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def load_safetensors(source: str | os.PathLike | bytes) -> nn.Module:
    """Rebuild the composed model from a .safetensors export (needs the configs in its header)."""
    from safetensors.torch import load

    from .compose import ComposedModel
    from .nets import create

    blob = source if isinstance(source, bytes) else Path(source).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    meta = {k: json.loads(v) for k, v in json.loads(blob[8:8 + n]).get("__metadata__", {}).items()}
    comp = meta.get("composition") or {}
    if meta.get("format") != ARTIFACT_FORMAT or not comp.get("library") or not all(comp.get("experts") or [None]):
        raise UserError("not an expertpool composed-model safetensors file with its composition")
    model = ComposedModel(create(comp["library"]), [create(c) for c in comp["experts"]], meta["tasks"],
                          meta["labels"], meta["class_ids"], meta["group_sizes"])
    model.load_state_dict(load(blob))
    return model.eval()

