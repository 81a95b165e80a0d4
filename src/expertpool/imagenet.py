"""ImageNet (or any big ImageFolder tree), streamed from disk.

Layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*`` (the val images sorted into class folders,
as most ImageNet preparation scripts leave them); classes are the train folders in sorted order, and a
class's index is its position in that order (torchvision's ImageFolder convention).

``StreamSplit`` offers what the rest of the package uses of ``data.Split`` (``len``, ``labels``, ``shape``,
``mean``, ``std``, ``subset``, ``batches``, ``num_batches``), but decodes images in DataLoader workers:

* eval transform: Resize(size * 256 / 224) + CenterCrop(size);
* train transform (``augment=True``): RandomResizedCrop(size) + random horizontal flip.

Reproducibility: ``batches(..., generator=g)`` draws the order and one seed per image from ``g``; each image's
crop and flip come from a generator seeded with its own seed, so a batch is a function of ``g``'s state only,
whatever the number of workers (0 included) and however the workers are scheduled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .data import ImageData
from .errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def default_workers() -> int:
    """DataLoader workers: ``EXPERTPOOL_NUM_WORKERS`` when set, else 2."""
    try:
        return max(0, int(os.environ.get("EXPERTPOOL_NUM_WORKERS", "2")))
    except ValueError:
        return 2


def list_folder(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image files of ``folder/<class>/`` (recursively, sorted) for every class, and their labels."""
    paths: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        d = folder / c
        if not d.is_dir():
            continue
        for dirpath, dirnames, filenames in sorted(os.walk(d, followlinks=True)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(os.path.join(dirpath, name))
                    labels.append(i)
    return paths, labels


# --------------------------------------------------------------------------- per-image transforms
def _random_resized_crop_params(w: int, h: int, g: torch.Generator, scale=(0.08, 1.0),
                                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=g).item())
            j = int(torch.randint(0, w - cw + 1, (1,), generator=g).item())
            return i, j, ch, cw
    in_ratio = w / h  # fallback: central crop
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class _Images(torch.utils.data.Dataset):
    """Items are ``(index, seed)`` pairs: seed < 0 means the eval transform, else a seeded augmentation."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        index, seed = item
        with Image.open(self.paths[index]) as im:
            im = im.convert("RGB")
        s = self.size
        if seed < 0:
            im = TF.center_crop(TF.resize(im, int(s * 256 / 224), InterpolationMode.BILINEAR), [s, s])
        else:
            g = torch.Generator().manual_seed(seed)
            w, h = im.size
            top, left, ch, cw = _random_resized_crop_params(w, h, g)
            im = TF.resized_crop(im, top, left, ch, cw, [s, s], InterpolationMode.BILINEAR)
            if torch.rand(1, generator=g).item() < 0.5:
                im = TF.hflip(im)
        return TF.pil_to_tensor(im), self.labels[index]


# --------------------------------------------------------------------------- the split
@dataclass
class StreamSplit:
    """A class-folder tree read on the fly; the same interface as ``data.Split``."""

    paths: list[str]
    label_list: list[int]
    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_workers: int = field(default_factory=default_workers)

    def __post_init__(self):
        self._labels = torch.tensor(self.label_list, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def subset(self, classes: list[int]) -> "StreamSplit":
        """The images of ``classes``, relabelled to their position in ``classes``."""
        pos = {int(c): i for i, c in enumerate(classes)}
        keep = [(p, pos[y]) for p, y in zip(self.paths, self.label_list) if y in pos]
        return replace(self, paths=[p for p, _ in keep], label_list=[y for _, y in keep])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255 - mean) / std

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

    def items(self, shuffle: bool = False, augment: bool = False,
              generator: torch.Generator | None = None) -> list[tuple[int, int]]:
        """The ``(index, seed)`` pairs of one pass, drawn from ``generator`` (the global RNG when None)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        seeds = torch.randint(0, 2 ** 62, (n,), generator=generator) if augment else torch.full((n,), -1)
        return list(zip(order.tolist(), seeds.tolist()))

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Batch]:
        """Normalised float batches; shuffling and augmentation draw from ``generator``."""
        items = self.items(shuffle, augment, generator)
        if not items:
            return
        loader = torch.utils.data.DataLoader(
            _Images(self.paths, self._labels, self.size), batch_size=batch_size, sampler=items,
            drop_last=drop_last and len(items) >= batch_size, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(0))  # worker seeds (unused): not drawn from the global RNG
        for x, y in loader:
            yield self.normalize(x), y


def load_imagenet(root: str | None, image_size: int = 224, num_workers: int | None = None) -> ImageData:
    """``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` (or ``test/``), streamed; classes in sorted order.

    The default hierarchy is ``imagenet-birds`` for the 1000-class set; any other class count needs
    ``--hierarchy``."""
    if not root or not Path(root, "train").is_dir():
        raise UserError(f"no ImageNet tree at {root!r}: pass --data-root DIR with train/<wnid>/ and val/<wnid>/")
    root_p = Path(root)
    test_dir = root_p / "val" if (root_p / "val").is_dir() else root_p / "test"
    if not test_dir.is_dir():
        raise UserError(f"{root} has train/ but neither val/ nor test/")
    classes = sorted(e.name for e in os.scandir(root_p / "train") if e.is_dir())
    if not classes:
        raise UserError(f"no class folders under {root_p / 'train'}")
    if image_size is None or image_size < 8:
        raise UserError(f"--image-size must be at least 8, got {image_size}")
    workers = default_workers() if num_workers is None else num_workers
    splits = []
    for d in (root_p / "train", test_dir):
        paths, labels = list_folder(d, classes)
        if not paths:
            raise UserError(f"no images found under {d}/<class>/ (val images must be sorted into class folders)")
        splits.append(StreamSplit(paths, labels, image_size, num_workers=workers))
    return ImageData("imagenet", classes, splits[0], splits[1],
                     "imagenet-birds" if len(classes) == 1000 else None)
