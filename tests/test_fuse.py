import pytest
import torch
from torch import nn

import expertpool
from expertpool.fuse import FusedExperts, PatchStem, fold_conv_bn, fuse
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
    x = torch.randn(16, *pool.input_shape)
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() < 1e-5
    # fusing copies: the pool's own experts are untouched
    assert fused.experts.blocks[0].conv1.weight.data_ptr() != pool.expert(tasks[0]).block3.layer[0].conv1.weight.data_ptr()


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


def test_one_channel_library_is_fused_with_a_patch_stem():
    from expertpool.compose import ComposedModel
    from expertpool.nets import WRNLibrary

    torch.manual_seed(0)
    library = WRNLibrary(10, 1, in_channels=1).eval()
    experts = [WRNExpert(n, library.out_channels, 10, 0.25).eval() for n in (2, 3)]
    plain = ComposedModel(library, experts, ["a", "b"], list("xyzuv"), [0, 1, 2, 3, 4], [2, 3])
    fused = fuse(plain)
    assert isinstance(fused.library.conv1, PatchStem)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() < 1e-5
