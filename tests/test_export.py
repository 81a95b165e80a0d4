"""Exports of composed models: ONNX (checked in ONNX Runtime), safetensors, torch.export; the CLI --export flag."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from expertpool import open_pool
from expertpool.cli import main
from expertpool.errors import UserError
from expertpool.export import Exporter, ExportMismatch, export, load_safetensors, read_onnx_metadata, verify_onnx
from expertpool.select import compose_classes


@pytest.fixture(scope="module")
def pool(tiny_pool_path):
    torch.set_num_threads(1)
    return open_pool(tiny_pool_path)


@pytest.fixture(scope="module")
def exporter():
    return Exporter()


def _ort(path_or_bytes, x: torch.Tensor) -> np.ndarray:
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def test_onnx_has_dynamic_batch_metadata_and_matches_pytorch(pool, exporter, tmp_path):
    tasks = pool.tasks[:2]
    model = pool.compose(tasks)
    info = export(model, tmp_path / "m.onnx", pool.input_spec, exporter=exporter)
    assert info["format"] == "onnx" and info["bytes"] == (tmp_path / "m.onnx").stat().st_size
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["labels"] == model.labels and meta["tasks"] == tasks
    assert meta["label_groups"] == model.label_groups and meta["input"]["shape"] == list(pool.input_shape)
    assert meta["input"]["mean"] == pool.input_spec["mean"]
    for batch in (1, 5):
        x = torch.randn(batch, *pool.input_shape)
        with torch.no_grad():
            want = model(x).numpy()
        assert np.abs(_ort(tmp_path / "m.onnx", x) - want).max() < 1e-4


def test_pruned_model_exports_with_its_own_labels(pool, exporter):
    classes = [pool.task_classes(pool.tasks[2])[1], pool.task_classes(pool.tasks[0])[0]]
    model = compose_classes(pool, classes, only_requested_rows=True)
    blob = exporter.onnx_bytes(model, pool.input_spec)
    assert read_onnx_metadata(blob)["labels"] == model.labels and len(model.labels) == 2
    x = torch.randn(3, *pool.input_shape)
    with torch.no_grad():
        assert np.abs(_ort(blob, x) - model(x).numpy()).max() < 1e-4


def test_mismatch_is_detected(pool, exporter):
    model = pool.compose(pool.tasks[:1])
    blob = exporter.onnx_bytes(model, pool.input_spec)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.experts[0].fc.bias += 1.0
    with pytest.raises(ExportMismatch):
        verify_onnx(blob, other, pool.input_spec)


def test_model_of_another_shape_is_exported_whole(pool, exporter):
    class Plain(nn.Module):  # no library/experts split: torch's exporter on the whole model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.labels, self.tasks = inner.labels, inner.tasks
            self.label_groups, self.class_ids, self.group_sizes = inner.label_groups, inner.class_ids, inner.group_sizes

        def forward(self, x):
            return self.inner(x) * 2.0

    model = Plain(pool.compose(pool.tasks[:1])).eval()
    blob = exporter.onnx_bytes(model, pool.input_spec)
    x = torch.randn(2, *pool.input_shape)
    with torch.no_grad():
        assert np.abs(_ort(blob, x) - model(x).numpy()).max() < 1e-4
    assert "composition" not in read_onnx_metadata(blob)


def test_safetensors_rebuilds_the_model(pool, exporter, tmp_path):
    model = pool.compose(pool.tasks[1:3])
    info = export(model, tmp_path / "m.safetensors", pool.input_spec, exporter=exporter)
    assert info["format"] == "safetensors"
    back = load_safetensors(tmp_path / "m.safetensors")
    assert back.labels == model.labels and back.label_groups == model.label_groups
    x = torch.randn(2, *pool.input_shape)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_pt2_program_runs_with_any_batch(pool, exporter, tmp_path):
    model = pool.compose(pool.tasks[:2])
    export(model, tmp_path / "m.pt2", pool.input_spec, exporter=exporter)
    program = torch.export.load(str(tmp_path / "m.pt2"))
    for batch in (1, 4):
        x = torch.randn(batch, *pool.input_shape)
        with torch.no_grad():
            assert (program.module()(x) - model(x)).abs().max() < 1e-5


def test_unknown_suffix_is_a_user_error(pool, tmp_path):
    with pytest.raises(UserError, match="must end in"):
        export(pool.compose(pool.tasks[:1]), tmp_path / "m.txt", pool.input_spec)


def test_cli_query_export(tiny_pool_path, pool, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["query", "--pool", str(tiny_pool_path), "--tasks", *pool.tasks[:2], "--json", "--export", str(out)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["export"]["path"] == str(out) and answer["export"]["bytes"] == out.stat().st_size
    assert main(["query", "--pool", str(tiny_pool_path), "--tasks", pool.tasks[0], "--export", str(tmp_path / "x.doc")]) == 2
    assert "error:" in capsys.readouterr().err


def test_assembled_onnx_is_the_bare_network_and_templates_refill_with_other_weights(pool):
    exporter = Exporter()
    tasks = pool.tasks[:3]
    model = pool.compose(tasks)
    proto = onnx.load_from_string(exporter.onnx_bytes(model, pool.input_spec))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Shape", "Expand", "CastLike", "Constant"}, ops  # the exporter's zero-bias plumbing, folded
    assert not any(n.metadata_props for n in proto.graph.node)  # no per-node Python stacks
    names = {i.name for i in proto.graph.initializer}
    for key in model.library.state_dict():
        if not key.endswith("num_batches_tracked"):
            assert f"lib/{key}" in names, key  # every weight kept by name (BatchNorms not folded away)
    # the same templates, filled with other weights, give the other model's outputs
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in other.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1)
    blob = exporter.onnx_bytes(other, pool.input_spec)
    x = torch.randn(3, *pool.input_shape)
    with torch.no_grad():
        want, before = other(x).numpy(), model(x).numpy()
    assert np.abs(_ort(blob, x) - want).max() < 1e-4
    assert np.abs(want - before).max() > 1e-2  # the two models really differ
