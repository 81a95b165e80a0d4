import os

import pytest
import torch

from expertpool.data import Augment, FASHION_MNIST_DEBIAN, augment_batch, load, load_synthetic
from expertpool.errors import UserError


def test_synthetic_is_seeded_and_hierarchical():
    a, b = load_synthetic(0), load_synthetic(0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.input_shape == (3, 16, 16) and len(a.classes) == 12
    assert not torch.equal(load_synthetic(1).train.images, a.train.images)


def test_subset_relabels_in_the_given_order():
    d = load_synthetic(0)
    sub = d.test.subset([5, 0])
    assert set(sub.labels.tolist()) == {0, 1}
    assert torch.equal(sub.images[sub.labels == 0], d.test.images[d.test.labels == 5])
    assert torch.equal(sub.images[sub.labels == 1], d.test.images[d.test.labels == 0])


def test_batches_cover_the_split_and_normalise():
    d = load_synthetic(0)
    xs, ys = zip(*d.test.batches(128))
    assert sum(len(y) for y in ys) == len(d.test)
    assert xs[0].dtype == torch.float32 and xs[0].shape[1:] == (3, 16, 16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b1 = next(d.train.batches(64, True, True, g1))
    b2 = next(d.train.batches(64, True, True, g2))
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, Augment(pad=1, flip=True), g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    only_flip = augment_batch(x, Augment(pad=0, flip=True), torch.Generator().manual_seed(1))
    for a, b in zip(only_flip, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))


def test_unknown_and_missing_data_sets(tmp_path):
    with pytest.raises(UserError, match="unknown data set"):
        load("mnist3d")
    with pytest.raises(UserError, match="Fashion-MNIST file"):
        load("fashion-mnist", str(tmp_path))
    with pytest.raises(UserError, match="no ImageFolder tree"):
        load("imagefolder", str(tmp_path))
    with pytest.raises(UserError, match="Tiny-ImageNet not found"):
        load("tinyimagenet", str(tmp_path))


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), colour).save(tmp_path / split / c / f"{i}.png")
    d = load("imagefolder", str(tmp_path), image_size=8)
    assert d.classes == ["blue", "red"] and d.input_shape == (3, 8, 8)
    assert len(d.train) == 6 and len(d.test) == 6


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEBIAN), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    d = load("fashion-mnist")
    assert len(d.train) == 60_000 and len(d.test) == 10_000 and d.input_shape == (1, 28, 28)
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10
