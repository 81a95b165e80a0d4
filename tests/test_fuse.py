import pytest
import torch
from torch import nn

import expertpool
from expertpool.fuse import FusedExperts, fold_conv_bn, fuse
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
