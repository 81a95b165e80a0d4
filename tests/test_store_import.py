"""import-checkpoints: a pool from state dicts in the research code's key layout, written here by a small
independent copy of the research code's WideResNet (xternalz-style blocks, ``WideResNet_EX`` / ``_CL``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expertpool
from expertpool.cli import main, pool_info
from expertpool.hierarchy import builtin


class RBlock(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(i), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(o), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equalInOut = i == o
        self.convShortcut = None if self.equalInOut else nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, n, i, o, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RBlock(i if k == 0 else o, o, stride if k == 0 else 1) for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet_EX(nn.Module):
    def __init__(self, depth, widen, in_ch=3):
        super().__init__()
        n = (depth - 4) // 6
        c = [16, 16 * widen, 32 * widen]
        self.conv1 = nn.Conv2d(in_ch, c[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1)
        self.block2 = NetworkBlock(n, c[1], c[2], 2)

    def forward(self, x):
        return self.block2(self.block1(self.conv1(x)))


class WideResNet_CL(nn.Module):
    def __init__(self, depth, num_classes, in_ch=32, out_ch=16):
        super().__init__()
        n = (depth - 4) // 6
        self.block3 = NetworkBlock(n, in_ch, out_ch, 2)
        self.bn1, self.relu = nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
        self.fc = nn.Linear(out_ch, num_classes)
        self.nChannels = out_ch

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(x)))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.view(-1, self.nChannels))


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so that eval mode differs from a fresh net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                elif t.ndim == 4:
                    t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / (t.shape[1] * 9)))
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") and t.ndim == 1 else 0))
    return net.eval()


def _save(net, path, old_style: bool):
    sd = net.state_dict()
    if old_style:  # PyTorch < 0.4.1: no BN counters, DataParallel prefix, reversed key order
        sd = OrderedDict((f"module.{k}", v) for k, v in reversed(list(sd.items())) if "num_batches_tracked" not in k)
    torch.save(sd, path, _use_new_zipfile_serialization=not old_style)


TASKS = {"people": 0, "vehicles_1": 1, "flowers": 2}


@pytest.fixture
def research_pool(tmp_path):
    lib = _randomize(WideResNet_EX(10, 1), 1)
    experts = {t: _randomize(WideResNet_CL(10, 5), 10 + i) for t, i in TASKS.items()}
    _save(lib, tmp_path / "lib.pt", old_style=True)
    for i, (t, e) in enumerate(experts.items()):
        _save(e, tmp_path / f"{t}.pt", old_style=bool(i % 2))
    return tmp_path, lib, experts


def test_import_round_trip(research_pool, capsys):
    d, lib, experts = research_pool
    pool_path = d / "imported.db"
    args = ["import-checkpoints", "--pool", str(pool_path), "--library", str(d / "lib.pt"), "--hierarchy", "cifar100",
            "--expert"] + [f"{t}={d / f'{t}.pt'}" for t in TASKS]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["library"]["config"] == {"arch": "wrn_library", "depth": 10, "width": 1, "in_channels": 3,
                                           "first_stride": 1}
    pool = expertpool.open_pool(pool_path)
    assert sorted(pool.tasks) == sorted(TASKS)
    query = ["vehicles_1", "people", "flowers"]
    model = pool.compose(query)
    h = builtin("cifar100")
    assert model.labels == [h.classes[c] for t in query for c in h.tasks[t]]
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(x)
        theirs = torch.cat([experts[t](lib(x)) for t in query], dim=1)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
    info = pool_info(str(pool_path))
    assert info["oracle"] is None and info["dataset"] == "cifar100" and len(info["experts"]) == 3
    assert info["library"]["params"] == sum(p.numel() for p in lib.parameters())
    assert main(["pool", "verify", "--pool", str(pool_path)]) == 0


def test_import_bad_input(research_pool, tmp_path):
    d, _, _ = research_pool
    (d / "junk.pt").write_text("not a checkpoint")
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, d / "half.pt")
    cases = [
        (["--library", str(d / "lib.pt"), "--expert", f"nope={d / 'people.pt'}"], "unknown task"),
        (["--library", str(d / "junk.pt"), "--expert", f"people={d / 'people.pt'}"], "cannot read checkpoint"),
        (["--library", str(d / "half.pt"), "--expert", f"people={d / 'people.pt'}"], "library"),
        (["--library", str(d / "people.pt"), "--expert", f"people={d / 'people.pt'}"], "library"),
        (["--library", str(d / "lib.pt"), "--expert", f"people={d / 'lib.pt'}"], "expert"),
        (["--library", str(d / "lib.pt"), "--expert", f"people"], "TASK=FILE"),
    ]
    for i, (args, msg) in enumerate(cases):
        out = tmp_path / f"p{i}.db"
        r = subprocess.run([sys.executable, "-m", "expertpool.cli", "import-checkpoints", "--pool", str(out),
                            "--hierarchy", "cifar100", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists()
