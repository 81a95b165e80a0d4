"""Data sets as in-memory uint8 image tensors, with batched augmentation (random crop + flip).

Every loader returns an ``ImageData``: class names, a train and a test ``Split``, the normalisation and
augmentation the paper uses for that data set, and the name of its default hierarchy. A ``Split`` yields
normalised float batches; ``split.subset(classes)`` is a class-subset view whose labels are relabelled
to 0..k-1 **in the order the classes are given** (for a composite task: the experts' output order).

Small data sets (Fashion-MNIST, CIFAR-100, Tiny-ImageNet, a small ImageFolder, the synthetic set) are held
in memory as uint8 and augmented on whole batches, which is far faster on CPU than a per-image PIL
pipeline. ImageNet streams from disk through torchvision's ImageFolder and DataLoader.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Augment:
    pad: int = 0  # random crop of the original size after zero padding by `pad` pixels
    flip: bool = False  # random horizontal flip


@dataclass
class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64, plus how to normalise and augment them."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = field(default_factory=Augment)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, classes: list[int]) -> "Split":
        """The images of ``classes``, relabelled to their position in ``classes``."""
        lut = torch.full((int(self.labels.max()) + 1 if len(self.labels) else 1,), -1, dtype=torch.long)
        lut[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
        keep = lut[self.labels] >= 0
        return Split(self.images[keep], lut[self.labels[keep]], self.mean, self.std, self.augment)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255 - mean) / std

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Batch]:
        """Normalised float batches; shuffling and augmentation draw from ``generator``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            x = self.images[idx]
            if augment:
                x = augment_batch(x, self.augment, generator)
            yield self.normalize(x), self.labels[idx]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (after zero padding) and random horizontal flip of a whole uint8 batch."""
    n, _, h, w = x.shape
    if aug.pad:
        p = aug.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if aug.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train: Split
    test: Split
    default_hierarchy: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.shape


# --------------------------------------------------------------------------- loaders
def _to_split(images: np.ndarray | torch.Tensor, labels, mean, std, aug: Augment) -> Split:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long), mean, std, aug)


FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(root: str | None = None) -> ImageData:
    from .hierarchy import FASHION_MNIST_CLASSES

    root = root or (FASHION_MNIST_DEBIAN if os.path.isdir(FASHION_MNIST_DEBIAN) else None)
    if root is None:
        raise UserError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                        f"(files in {FASHION_MNIST_DEBIAN}) or pass --data-root DIR with the four IDX files")

    def idx(stem: str, offset: int) -> np.ndarray:
        for name in (stem + ".gz", stem):
            p = Path(root, name)
            if p.is_file():
                raw = gzip.open(p).read() if name.endswith(".gz") else p.read_bytes()
                return np.frombuffer(raw, dtype=np.uint8, offset=offset).copy()
        raise UserError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")

    mean, std, aug = (0.2860,), (0.3530,), Augment(pad=2, flip=True)
    train = _to_split(idx("train-images-idx3-ubyte", 16).reshape(-1, 28, 28), idx("train-labels-idx1-ubyte", 8),
                      mean, std, aug)
    test = _to_split(idx("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28), idx("t10k-labels-idx1-ubyte", 8),
                     mean, std, aug)
    return ImageData("fashion-mnist", list(FASHION_MNIST_CLASSES), train, test, "fashion-mnist")


def load_cifar100(root: str | None) -> ImageData:
    from torchvision.datasets import CIFAR100

    from .hierarchy import CIFAR100_COARSE

    root = root or os.path.expanduser("~/.cache/expertpool/data")
    try:
        sets = [CIFAR100(root, train=t, download=False) for t in (True, False)]
    except RuntimeError:
        raise UserError(f"CIFAR-100 not found under {root} (expects cifar-100-python/); pass --data-root DIR") from None
    import pickle

    with open(Path(root, "cifar-100-python", "train"), "rb") as f:  # the data set's own coarse labels
        coarse = pickle.load(f, encoding="latin1")["coarse_labels"]
    fine = sets[0].targets
    if any(CIFAR100_COARSE[f] != c for f, c in zip(fine, coarse)):
        raise UserError("CIFAR-100 coarse labels in the files differ from the built-in superclass table")
    mean, std, aug = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), Augment(pad=4, flip=True)
    train, test = (_to_split(s.data, s.targets, mean, std, aug) for s in sets)
    return ImageData("cifar100", list(sets[0].classes), train, test, "cifar100")


def _read_images(paths: list[Path], size: int | None) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out.append(pil_to_tensor(im))
    if len({tuple(t.shape) for t in out}) > 1:
        raise UserError("images differ in size; pass --image-size N to resize them")
    return torch.stack(out)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_tinyimagenet(root: str | None) -> ImageData:
    """The official layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt."""
    if not root or not Path(root, "wnids.txt").is_file():
        raise UserError(f"Tiny-ImageNet not found at {root!r}: pass --data-root DIR containing wnids.txt, train/, val/")
    root_p = Path(root)
    wnids = sorted(Path(root_p, "wnids.txt").read_text().split())
    words = {}
    if (root_p / "words.txt").is_file():
        for line in (root_p / "words.txt").read_text().splitlines():
            k, _, v = line.partition("\t")
            words[k] = v.split(",")[0].strip()
    names = [f"{w}:{words[w]}" if w in words else w for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}
    tr_paths, tr_labels = [], []
    for w in wnids:
        ps = _list_images(root_p / "train" / w)
        tr_paths += ps
        tr_labels += [index[w]] * len(ps)
    va_paths, va_labels = [], []
    for line in (root_p / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            va_paths.append(root_p / "val" / "images" / parts[0])
            va_labels.append(index[parts[1]])
    mean, std, aug = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), Augment(pad=8, flip=True)
    train = _to_split(_read_images(tr_paths, 64), tr_labels, mean, std, aug)
    test = _to_split(_read_images(va_paths, 64), va_labels, mean, std, aug)
    return ImageData("tinyimagenet", names, train, test, "tinyimagenet")


def load_imagefolder(root: str | None, image_size: int | None = None) -> ImageData:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val/``); classes in sorted folder order."""
    if not root or not Path(root, "train").is_dir():
        raise UserError(f"no ImageFolder tree at {root!r}: pass --data-root DIR with train/ and test/ (or val/)")
    root_p = Path(root)
    test_dir = root_p / "test" if (root_p / "test").is_dir() else root_p / "val"
    if not test_dir.is_dir():
        raise UserError(f"{root} has train/ but neither test/ nor val/")
    classes = sorted(p.name for p in (root_p / "train").iterdir() if p.is_dir())
    splits = []
    for d in (root_p / "train", test_dir):
        paths, labels = [], []
        for i, c in enumerate(classes):
            ps = _list_images(d / c)
            paths += ps
            labels += [i] * len(ps)
        if not paths:
            raise UserError(f"no images found under {d}")
        splits.append((_read_images(paths, image_size), labels))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    size = splits[0][0].shape[-1]
    aug = Augment(pad=max(1, size // 8), flip=True)
    train, test = (_to_split(x, y, mean, std, aug) for x, y in splits)
    return ImageData("imagefolder", classes, train, test, None)


# --------------------------------------------------------------------------- synthetic hierarchical set
SYNTHETIC_TASKS = {name: [3 * t + j for j in range(3)] for t, name in enumerate(["alpha", "beta", "gamma", "delta"])}
SYNTHETIC_CLASSES = [f"{name}_{j}" for name in SYNTHETIC_TASKS for j in range(3)]


def load_synthetic(seed: int = 0, train_per_class: int = 300, test_per_class: int = 100, size: int = 16) -> ImageData:
    """A seeded, hierarchical toy set: 4 primitive tasks x 3 classes of 3x16x16 images.

    Each task has a smooth random colour pattern; each class adds its own smaller pattern, so classes of
    one task look alike (as CIFAR-100's superclasses do). A sample is its class pattern, shifted by up to
    two pixels, plus noise. A WRN-10 learns it to about 90 % in a few seconds.
    """
    g = torch.Generator().manual_seed(seed)

    def smooth(n: int) -> torch.Tensor:
        low = torch.randn(n, 3, 4, 4, generator=g)
        return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)

    n_tasks, per_task = len(SYNTHETIC_TASKS), 3
    protos = smooth(n_tasks).repeat_interleave(per_task, 0) + 0.5 * smooth(n_tasks * per_task)

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(protos)).repeat_interleave(per_class)
        x = protos[labels]
        shifts = torch.randint(-2, 3, (len(labels), 2), generator=g)
        x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(x, shifts)])
        x = x + 1.5 * torch.randn(x.shape, generator=g)
        return (x * 40 + 128).clamp(0, 255).to(torch.uint8), labels

    mean, std, aug = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), Augment(pad=1, flip=False)
    train = Split(*sample(train_per_class), mean, std, aug)
    test = Split(*sample(test_per_class), mean, std, aug)
    return ImageData("synthetic", list(SYNTHETIC_CLASSES), train, test, "synthetic")


DATASETS = ["cifar100", "tinyimagenet", "imagenet", "fashion-mnist", "imagefolder", "synthetic"]


def load(name: str, root: str | None = None, seed: int = 0, image_size: int | None = None) -> ImageData:
    """Load a data set by name (see ``DATASETS``)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "synthetic":
        return load_synthetic(seed)
    if name == "cifar100":
        return load_cifar100(root)
    if name == "tinyimagenet":
        return load_tinyimagenet(root)
    if name == "imagefolder":
        return load_imagefolder(root, image_size)
    if name == "imagenet":
        from .imagenet import load_imagenet

        return load_imagenet(root, image_size or 224)
    raise UserError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
