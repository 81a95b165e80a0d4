import torch
from torch import nn

from expertpool.data import load_synthetic
from expertpool.nets import create
from expertpool.train import TrainConfig, fit, resolve_runtime


def _run(seed):
    torch.manual_seed(seed)
    model = create({"arch": "wrn", "num_classes": 12, "depth": 10, "width": 1})
    data = load_synthetic(0)
    cfg = TrainConfig(3, 0.1, (2,), batch_size=128)
    stats = fit(model, lambda e, g: data.train.batches(128, True, True, g, drop_last=True),
                lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), cfg,
                resolve_runtime("cpu", "auto", progress=False), seed=seed)
    return model, stats


def test_fit_is_reproducible_and_learns():
    a, stats = _run(1)
    b, _ = _run(1)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    c, _ = _run(2)
    assert not torch.equal(a.state_dict()["library.conv1.weight"], c.state_dict()["library.conv1.weight"])
    assert stats["final_loss"] < 1.5 and stats["images_per_s"] > 0


def test_schedule_scaling():
    assert TrainConfig(200, 0.1, (80, 160)).scaled(10).milestones == (4, 8)


def test_tune_allocator_takes_effect_on_glibc():
    import platform
    import sys

    from expertpool.train import tune_allocator

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert tune_allocator() is True
