"""The ImageNet pipeline end to end on a tiny fake ImageNet tree written here: streamed split, torchvision
oracle (``--oracle torchvision:NAME:FILE``), pretrained MobileNetV2 library (``--library-weights``), experts
trained one at a time, then ``query --eval``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from expertpool.cli import main
from expertpool.data import load
from expertpool.imagenet import StreamSplit, load_imagenet
from expertpool.nets import MobileNetExpert, MobileNetLibrary, count_params

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.png, 40 px images of a colour per class, plus weights
    files (random resnet18 with 5 classes, random MobileNetV2) and a hierarchy file."""
    base = tmp_path_factory.mktemp("imagenet")
    root = base / "tree"
    g = torch.Generator().manual_seed(0)
    for split, n, ext in (("train", TRAIN_PER_CLASS, "JPEG"), ("val", VAL_PER_CLASS, "png")):
        for i, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                colour = torch.tensor([i * 50, 255 - i * 50, (i * 97) % 256]).view(3, 1, 1)
                h, w = 40, 40 + 8 * (j % 2)  # some images are not square
                x = (colour + 40 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / split / c / f"{c}_{j}.{ext}")
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), base / "resnet18.pth")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), base / "mobilenet_v2.pth")
    (base / "birds.json").write_text(json.dumps({"name": "fake-birds", "tasks": {
        "finches": [CLASSES[0], CLASSES[1]], "ducks": [CLASSES[2], CLASSES[3], CLASSES[4]]}}))
    return base


def test_stream_split_interface_and_reproducibility(tree):
    data = load("imagenet", str(tree / "tree"), image_size=32)
    assert data.name == "imagenet" and data.classes == CLASSES and data.default_hierarchy is None
    tr, te = data.train, data.test
    assert isinstance(tr, StreamSplit) and len(tr) == 5 * TRAIN_PER_CLASS and len(te) == 5 * VAL_PER_CLASS
    assert tr.labels.dtype == torch.long and tr.labels.tolist() == [i for i in range(5) for _ in range(TRAIN_PER_CLASS)]
    assert tr.shape == (3, 32, 32) and data.input_shape == (3, 32, 32)
    assert tr.num_batches(16) == 3 and tr.num_batches(16, drop_last=True) == 2 and tr.num_batches(64, True) == 1

    # eval batches: in file order, normalised, labels as listed
    xs, ys = zip(*te.batches(4))
    assert [len(y) for y in ys] == [4, 4, 4, 3] and torch.equal(torch.cat(ys), te.labels)
    assert xs[0].dtype == torch.float32 and xs[0].shape == (4, 3, 32, 32) and xs[0].abs().max() < 5

    def run(seed: int, workers: int) -> list:
        split = load_imagenet(str(tree / "tree"), 32, num_workers=workers).train
        g = torch.Generator().manual_seed(seed)
        return [b for epoch in range(2) for b in split.batches(16, True, True, g, drop_last=True)]

    a, b, c = run(7, 2), run(7, 0), run(8, 2)
    assert len(a) == 4 and all(len(y) == 16 for _, y in a)
    for (xa, ya), (xb, yb) in zip(a, b):  # same seed: same batches, whatever the number of workers
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[2][0])  # a second epoch draws new crops and order
    assert not torch.equal(a[0][0], c[0][0])  # another seed, other batches

    sub = te.subset([3, 0])  # relabelled to positions in the given order
    assert len(sub) == 2 * VAL_PER_CLASS and sub.labels.tolist() == [1] * VAL_PER_CLASS + [0] * VAL_PER_CLASS
    _, y = next(sub.batches(100))
    assert torch.equal(y, sub.labels)


def test_build_and_query_imagenet_pool(tree, tmp_path, capsys, monkeypatch):
    pool = tmp_path / "imagenet.db"
    base = ["build", "--dataset", "imagenet", "--data-root", str(tree / "tree"), "--pool", str(pool),
            "--preset", "tiny", "--image-size", "32", "--hierarchy", str(tree / "birds.json"), "--device", "cpu",
            "--precision", "fp32", "--no-progress"]
    oracle = ["--oracle", f"torchvision:resnet18:{tree / 'resnet18.pth'}"]
    library = ["--library-weights", str(tree / "mobilenet_v2.pth")]
    assert main(base + oracle) == 2  # the library is pretrained: its weights are required
    assert "--library-weights" in capsys.readouterr().err
    assert main(base + ["--oracle", f"torchvision:nosuchnet:{tree / 'resnet18.pth'}"] + library) == 2
    assert "nosuchnet" in capsys.readouterr().err
    assert not pool.exists()

    assert main(base + oracle + library) == 0
    capsys.readouterr()
    assert main(["pool", "info", "--pool", str(pool), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["oracle"]["config"] == {"arch": "torchvision", "name": "resnet18", "num_classes": 5}
    assert info["library"]["config"] == {"arch": "mobilenet_v2_library", "in_channels": 3}  # no weights file
    assert info["library"]["metrics"]["pretrained"] is True
    assert {e["task"] for e in info["experts"]} == {"finches", "ducks"}
    assert all(e["config"]["arch"] == "mobilenet_v2_expert" for e in info["experts"])

    # the pool holds every weight: the weights files are not needed any more
    (tree / "mobilenet_v2.pth").rename(tree / "moved.pth")
    try:
        assert main(["query", "--pool", str(pool), "--tasks", "ducks", "finches", "--eval", "--json",
                     "--device", "cpu"]) == 0
    finally:
        (tree / "moved.pth").rename(tree / "mobilenet_v2.pth")
    answer = json.loads(capsys.readouterr().out)
    assert answer["labels"] == CLASSES[2:] + CLASSES[:2]
    assert answer["label_groups"] == {"ducks": CLASSES[2:], "finches": CLASSES[:2]}
    lib = count_params(MobileNetLibrary())
    assert answer["params"] == lib + count_params(MobileNetExpert(3)) + count_params(MobileNetExpert(2))
    assert 0 <= answer["accuracy"] <= 100

    # a resumed build finds every component and changes nothing
    before = {e["task"]: e["sha256"] for e in info["experts"]}
    assert main(base + oracle + library) == 0
    capsys.readouterr()
    assert main(["pool", "info", "--pool", str(pool), "--json"]) == 0
    assert {e["task"]: e["sha256"] for e in json.loads(capsys.readouterr().out)["experts"]} == before

    # a fresh build with the same seed gives the same experts, bit for bit (seeded streaming, 0 workers)
    again = tmp_path / "again.db"
    monkeypatch.setenv("EXPERTPOOL_NUM_WORKERS", "0")
    assert main([a.replace(str(pool), str(again)) for a in base] + oracle + library) == 0
    capsys.readouterr()
    assert main(["pool", "info", "--pool", str(again), "--json"]) == 0
    assert {e["task"]: e["sha256"] for e in json.loads(capsys.readouterr().out)["experts"]} == before
