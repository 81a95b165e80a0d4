import os

import pytest
import torch
from torch import nn

import expertpool
from expertpool.data import FASHION_MNIST_DEBIAN
from expertpool.fuse import (ConvStem, FusedExperts, PatchStem, SeparateExperts, conv_add_, conv_relu, fold_conv_bn,
                             fuse)
from expertpool.nets import WRNExpert


def test_fold_conv_bn():
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(3, 4, 9, 9)
    assert (fold_conv_bn(conv, bn)(x) - bn(conv(x))).abs().max() < 1e-5


@pytest.mark.parametrize("tasks", [["alpha"], ["delta", "beta"], ["alpha", "beta", "gamma", "delta"]])
def test_fused_equals_plain(tiny_pool_path, tasks):
    pool = expertpool.open_pool(tiny_pool_path)
    plain, fused = pool.compose(tasks), pool.compose(tasks, fused=True)
    assert fused.labels == plain.labels and fused.label_groups == plain.label_groups
    assert fused.class_ids == plain.class_ids
    assert fused.choices["experts"] in ("grouped", "separate") and not fused.training
    x = torch.randn(16, *pool.input_shape)
    kept = x.clone()
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() < 1e-5
    assert torch.equal(x, kept)  # in-place additions never touch the caller's tensor
    # fusing copies: the pool's own weights are untouched
    pool_weights = {p.data_ptr() for p in plain.parameters()}
    assert not pool_weights & {p.data_ptr() for p in fused.parameters()}


@pytest.mark.parametrize("experts", ["grouped", "separate"])
def test_both_ways_of_running_the_experts_equal_plain(tiny_pool_path, experts):
    pool = expertpool.open_pool(tiny_pool_path)
    plain = pool.compose(["gamma", "alpha", "delta"])
    fused = fuse(plain, experts=experts)
    assert isinstance(fused.experts, FusedExperts if experts == "grouped" else SeparateExperts)
    assert fused.choices == {"stem": "conv", "experts": experts, "engine": "torch"}
    x = torch.randn(9, *pool.input_shape)
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() < 1e-5


def test_auto_choices_are_measured_on_the_probe_and_unknown_ones_refused(tiny_pool_path):
    pool = expertpool.open_pool(tiny_pool_path)
    plain = pool.compose(["alpha", "beta"])
    # no probe: the documented defaults
    assert fuse(plain).choices == {"stem": "conv", "experts": "separate", "engine": "torch"}
    probed = fuse(plain, probe=torch.randn(32, *pool.input_shape))
    assert probed.choices["experts"] in ("grouped", "separate")
    assert probed.choices["engine"] in ("torch", "onnxruntime")
    with pytest.raises(ValueError, match="unknown"):
        fuse(plain, experts="sideways")
    with pytest.raises(ValueError, match="unknown"):
        fuse(plain, engine="tpu")
    with pytest.raises(ValueError, match="one-channel"):
        fuse(plain, stem="patch")  # the tiny pool's images have three channels


def test_onnxruntime_engine_equals_plain_and_survives_copies(tiny_pool_path):
    import copy
    import pickle

    pool = expertpool.open_pool(tiny_pool_path)
    plain = pool.compose(["delta", "alpha", "gamma"])
    probe = torch.randn(16, *pool.input_shape)
    fused = fuse(plain, probe, engine="onnxruntime")
    assert fused.choices["engine"] == "onnxruntime" and fused.graph is not None
    x = torch.randn(40, *pool.input_shape)
    with torch.no_grad():
        want = plain(x)
        got = fused(x)
        assert (got - want).abs().max().item() < 1e-5
        assert (fused.forward_torch(x) - want).abs().max().item() < 1e-5  # the PyTorch engine is kept too
        fused.micro_batch = 16  # batches larger than a micro-batch go through in parts
        assert (fused(x) - want).abs().max().item() < 1e-5
        for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):  # a session of its own
            assert twin.graph.session is not fused.graph.session and torch.equal(twin(x), fused(x))


def test_an_onnx_graph_outside_the_tolerance_is_not_used(tiny_pool_path, monkeypatch):
    import expertpool.fuse as fuse_module

    pool = expertpool.open_pool(tiny_pool_path)
    plain = pool.compose(["alpha", "beta"])
    monkeypatch.setattr(fuse_module, "TOLERANCE", 0.0)  # no graph can be closer than 0
    fused = fuse(plain, torch.randn(8, *pool.input_shape), engine="onnxruntime")
    assert fused.choices["engine"] == "torch" and fused.graph is None
    assert fuse(plain, engine="onnxruntime").choices["engine"] == "torch"  # no probe to check a graph on


@pytest.mark.parametrize("shortcut", [False, True])
def test_convolutions_with_post_ops_equal_the_separate_ops(shortcut):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, 1, 1, bias=True).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert (conv_relu(x, conv) - conv(x).relu()).abs().max() < 1e-6
        out = torch.randn(4, 8, 10, 10)
        out = out.contiguous(memory_format=torch.channels_last) if shortcut else out  # NCHW: the plain fallback
        want = out + conv(x)
        got = conv_add_(out, x, conv)
        assert got.data_ptr() == out.data_ptr() and (got - want).abs().max() < 1e-5


def test_experts_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        FusedExperts([WRNExpert(2, 32, 16, 0.25), WRNExpert(2, 32, 16, 0.5)])


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_patch_stem_equals_the_convolution(stride, bias):
    conv = nn.Conv2d(1, 8, 3, stride, 1, bias=bias)
    x = torch.randn(5, 1, 13, 13)
    with torch.no_grad():
        got, want = PatchStem(conv)(x), conv(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_large_batches_run_as_micro_batches_with_equal_outputs(tiny_pool_path):
    pool = expertpool.open_pool(tiny_pool_path)
    plain, fused = pool.compose(["beta", "alpha", "gamma"]), pool.compose(["beta", "alpha", "gamma"], fused=True)
    fused.micro_batch = 4
    x = torch.randn(11, *pool.input_shape)  # 4 + 4 + 3
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() < 1e-5
        assert torch.equal(fused(x)[4:8], fused(x[4:8]))


def test_one_channel_library_is_fused_with_either_stem():
    from expertpool.compose import ComposedModel
    from expertpool.nets import WRNLibrary

    torch.manual_seed(0)
    library = WRNLibrary(10, 1, in_channels=1).eval()
    experts = [WRNExpert(n, library.out_channels, 10, 0.25).eval() for n in (2, 3)]
    plain = ComposedModel(library, experts, ["a", "b"], list("xyzuv"), [0, 1, 2, 3, 4], [2, 3])
    x = torch.randn(6, 1, 28, 28)
    for stem, kind in (("patch", PatchStem), ("conv", ConvStem)):
        fused = fuse(plain, stem=stem)
        assert isinstance(fused.library.conv1, kind)
        with torch.no_grad():
            assert (fused(x) - plain(x)).abs().max().item() < 1e-5
    assert fuse(plain, probe=x).choices["stem"] in ("patch", "conv")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEBIAN), reason="Debian's dataset-fashion-mnist not installed")
@pytest.mark.parametrize("experts, engine", [("grouped", "torch"), ("separate", "torch"), ("separate", "onnxruntime")])
def test_fused_equals_plain_on_the_shipped_pool_and_real_images(experts, engine):
    """Trained weights, logits up to ~18: every fused form stays within 1e-5 of the plain model."""
    from pathlib import Path

    from expertpool.data import load

    pool = expertpool.open_pool(Path(__file__).parents[1] / "pools" / "fashion-mnist.db")
    plain = pool.compose(pool.tasks)
    x, _ = next(load("fashion-mnist").test.batches(1000))
    fused = fuse(plain, x[:64], stem="conv", experts=experts, engine=engine)
    assert fused.choices["engine"] == engine
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert want.abs().max() > 5  # real logits, not near zero
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(got.argmax(1), want.argmax(1))
