import torch

from expertpool.distill import ckd_loss
from expertpool.joint import ExpertGroup
from expertpool.nets import WRNExpert
from expertpool.train import TrainConfig, fit, resolve_runtime


def _experts(n_classes=(2, 3, 2)):
    out = []
    for i, n in enumerate(n_classes):
        torch.manual_seed(i)
        e = WRNExpert(n, 8, 10, 0.25)
        with torch.no_grad():
            for m in e.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2)
        out.append(e)
    return out


def _shuffled_batches(feats: torch.Tensor, logits: torch.Tensor, size: int = 64):
    """A ``batches(epoch, generator)`` function for ``fit``: the tensors reshuffled every epoch."""
    def batches(epoch, g):
        order = torch.randperm(len(feats), generator=g)
        for i in range(0, len(feats), size):
            yield feats[order[i:i + size]], logits[order[i:i + size]]
    return batches


def test_group_forward_equals_the_experts_side_by_side():
    experts = _experts()
    group = ExpertGroup(experts)
    f = torch.randn(4, 8, 8, 8)
    for mode in (True, False):
        group.train(mode)
        for e in experts:
            e.train(mode)
        with torch.no_grad():
            got = group(f)
            want = [e(f) for e in experts]
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            assert (g - w).abs().max() < 1e-5


def test_unpack_gives_back_the_same_weights():
    experts = _experts()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in experts]
    for e, state in zip(ExpertGroup(experts).unpack(), before):
        for k, v in e.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_training_a_group_of_one_equals_training_alone():
    rt = resolve_runtime("cpu", "fp32", progress=False)
    batches = _shuffled_batches(torch.randn(256, 8, 8, 8), torch.randn(256, 5))
    idx = torch.tensor([1, 3])
    cfg = TrainConfig(2, 0.1, (1,), batch_size=64)
    alone = _experts((2,))[0]
    fit(alone, batches, lambda m, b: ckd_loss(m(b[0]), b[1][:, idx]), cfg, rt, seed=3)
    group = ExpertGroup(_experts((2,)))
    fit(group, batches, lambda m, b: ckd_loss(m(b[0])[0], b[1][:, idx]), cfg, rt, seed=3)
    for k, v in group.unpack()[0].state_dict().items():
        assert torch.equal(v, alone.state_dict()[k]), k


def test_first_activation_equals_each_experts_own_batchnorm():
    experts = _experts()
    group = ExpertGroup(experts)
    f = torch.randn(6, 8, 8, 8)
    for mode in (False, True):
        group.train(mode)
        with torch.no_grad():
            a = group.first_activation(f)
        for i, e in enumerate(experts):
            e.train(mode)
            with torch.no_grad():
                want = torch.relu(e.block3.layer[0].bn1(f))
            assert (a[:, 8 * i:8 * (i + 1)] - want).abs().max() < 1e-5
    # in training, the K running statistics moved exactly as each expert's own BatchNorm's did
    bn = group.blocks[0].bn1
    for i, e in enumerate(experts):
        own = e.block3.layer[0].bn1
        assert torch.allclose(bn.running_mean[8 * i:8 * (i + 1)], own.running_mean, atol=1e-6)
        assert torch.allclose(bn.running_var[8 * i:8 * (i + 1)], own.running_var, atol=1e-6)


def test_training_a_group_equals_training_each_expert_alone():
    """Joint training is K separate trainings computed together (up to float rounding)."""
    rt = resolve_runtime("cpu", "fp32", progress=False)
    batches = _shuffled_batches(torch.randn(256, 8, 8, 8), torch.randn(256, 5))
    idxs = [torch.tensor([1, 3]), torch.tensor([0, 2, 4]), torch.tensor([2, 3])]
    cfg = TrainConfig(2, 0.05, (1,), batch_size=64)
    alone = _experts()
    for e, idx in zip(alone, idxs):
        fit(e, batches, lambda m, b, idx=idx: ckd_loss(m(b[0]), b[1][:, idx]), cfg, rt, seed=3)
    group = ExpertGroup(_experts())
    fit(group, batches, lambda m, b: sum(ckd_loss(o, b[1][:, i]) for o, i in zip(m(b[0]), idxs)), cfg, rt, seed=3)
    for got, want in zip(group.unpack(), alone):
        for k, v in got.state_dict().items():
            assert torch.allclose(v.float(), want.state_dict()[k].float(), atol=1e-4), k
