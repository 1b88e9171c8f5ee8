"""Data sets for training and evaluating MSDNet, each split into train / validation / test.

A data set is named by a *spec* string:

* ``digits`` (the default, no download): scikit-learn's handwritten digits (1,797 real 8x8
  grey images shipped inside scikit-learn), upscaled to 32x32 (bilinear) and repeated to 3
  channels for the CIFAR stem, normalized with the training split's mean and std, and split
  with a fixed seed (stratified) into 1,257 train / 180 validation / 360 test images.
* ``cifar10:/path`` / ``cifar100:/path``: a local folder in torchvision's format (the folder
  that *contains* ``cifar-10-batches-py/`` or ``cifar-100-python/``; the inner folder itself
  is accepted too). The validation split (5,000 images, as in the paper) is held out of the
  official training set; the official test set is the test split.
* ``imagenet:/path``: an ImageFolder root with ``train/`` and ``val/`` (one folder per class).
  The validation split (50,000 images as in the paper, at most a tenth of ``train/``) is held
  out of ``train/``; ``val/`` is the test split.

The validation split never sees training augmentation; it is what budgeted evaluation
calibrates its thresholds on. A missing or malformed data set raises :class:`DataError` with
a message naming the path and what was expected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from . import UserError

DATA_KINDS = ("digits", "cifar10", "cifar100", "imagenet")
DEFAULT_SPEC = "digits"

DIGITS_IMAGE_SIZE = 32
DIGITS_TEST_SIZE = 360
DIGITS_VAL_SIZE = 180

CIFAR_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError):
    """A data set is missing or malformed."""


@dataclass
class DataBundle:
    """The three splits of one data set and what a model needs to know about it."""

    name: str
    spec: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_size: tuple  # (C, H, W) of one image as the network sees it at test time
    stem: str  # 'cifar' or 'imagenet': the stem that fits the image size
    info: dict = field(default_factory=dict)


def parse_data_spec(spec: Optional[str]) -> tuple[str, Optional[Path]]:
    """``'digits'`` / ``None`` -> ``('digits', None)``; ``'cifar10:/p'`` -> ``('cifar10', Path('/p'))``."""
    if spec is None or spec.strip() == "" or spec.strip().lower() == "digits":
        return "digits", None
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise DataError(
            f"unknown data set {spec!r}: expected 'digits' (the embedded default), "
            "'cifar10:PATH', 'cifar100:PATH' or 'imagenet:PATH'"
        )
    if kind == "digits":
        raise DataError(f"data set {spec!r}: 'digits' is embedded and takes no path")
    if not sep or not path.strip():
        raise DataError(f"data set {spec!r}: expected '{kind}:PATH' with the folder that holds the data")
    return kind, Path(os.path.expanduser(path.strip()))


def load_data(spec: Optional[str] = None, *, val_size: Optional[int] = None, split_seed: int = 0,
              augment: bool = True) -> DataBundle:
    """Load the data set named by ``spec`` (see the module docstring) with its three splits.

    ``val_size`` overrides the size of the held-out validation split, ``split_seed`` the seed
    of the (deterministic) split, ``augment=False`` turns off training augmentation.
    """
    kind, path = parse_data_spec(spec)
    if val_size is not None and val_size < 1:
        raise DataError(f"--val-size must be at least 1, got {val_size}")
    if kind == "digits":
        return load_digits_data(val_size=val_size, split_seed=split_seed, augment=augment)
    if kind in ("cifar10", "cifar100"):
        return load_cifar_data(kind, path, val_size=val_size, split_seed=split_seed, augment=augment)
    return load_imagenet_data(path, val_size=val_size, split_seed=split_seed, augment=augment)


# ---------------------------------------------------------------------------------------------
# Embedded default: scikit-learn digits


class ImageTensorDataset(Dataset):
    """In-memory images ``[N, C, H, W]`` with labels; optional random translation.

    ``max_shift > 0`` pads by ``max_shift`` pixels with ``fill`` (the normalized background)
    and crops back at a random offset (the global torch RNG, so a seeded epoch is repeatable).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0, fill: float = 0.0):
        if images.shape[0] != labels.shape[0]:
            raise ValueError("images and labels must have the same length")
        self.images = images
        self.labels = labels
        self.max_shift = int(max_shift)
        self.fill = float(fill)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        img = self.images[index]
        if self.max_shift > 0:
            s = self.max_shift
            h, w = img.shape[-2:]
            padded = F.pad(img, (s, s, s, s), value=self.fill)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy:dy + h, dx:dx + w]
        return img, self.labels[index]


def digits_split_indices(labels, split_seed: int = 0, val_size: Optional[int] = None,
                         test_size: int = DIGITS_TEST_SIZE):
    """Stratified, deterministic (train, val, test) index arrays of the digits data set."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    val_size = DIGITS_VAL_SIZE if val_size is None else int(val_size)
    n = len(labels)
    if val_size + test_size >= n - 10:
        raise DataError(f"--val-size {val_size}: the digits data set has only {n} images "
                        f"({test_size} of them for the test split)")
    idx = np.arange(n)
    rest, test = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=labels)
    train, val = train_test_split(rest, test_size=val_size, random_state=split_seed + 1, stratify=labels[rest])
    return np.sort(train), np.sort(val), np.sort(test)


def load_digits_data(*, val_size: Optional[int] = None, split_seed: int = 0, augment: bool = True) -> DataBundle:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the embedded 'digits' data set needs scikit-learn (pip install scikit-learn)") from e
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), mode="bilinear",
                           align_corners=False).expand(-1, 3, -1, -1).contiguous()
    train_idx, val_idx, test_idx = digits_split_indices(digits.target, split_seed, val_size)
    train_idx, val_idx, test_idx = (torch.as_tensor(i, dtype=torch.long) for i in (train_idx, val_idx, test_idx))
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    images = (images - mean) / std
    background = (0.0 - mean) / std
    shift = 2 if augment else 0
    return DataBundle(
        name="digits",
        spec=DEFAULT_SPEC,
        train=ImageTensorDataset(images[train_idx], labels[train_idx], max_shift=shift, fill=background),
        val=ImageTensorDataset(images[val_idx], labels[val_idx]),
        test=ImageTensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10,
        input_size=(3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE),
        stem="cifar",
        info={"normalize_mean": mean, "normalize_std": std, "source": "sklearn.datasets.load_digits",
              "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)}},
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100 in torchvision's format


_CIFAR_LAYOUT = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py",
                ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"], 10),
    "cifar100": ("CIFAR-100", "cifar-100-python", ["train", "test", "meta"], 100),
}


def _held_out_split(n: int, val_size: int, split_seed: int, what: str):
    if val_size >= n:
        raise DataError(f"--val-size {val_size}: the {what} training set has only {n} images")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    val = perm[:val_size].sort().values
    train = perm[val_size:].sort().values
    return train.tolist(), val.tolist()


def load_cifar_data(kind: str, path: Path, *, val_size: Optional[int] = None, split_seed: int = 0,
                    augment: bool = True) -> DataBundle:
    import torchvision
    from torchvision import transforms as T

    title, folder, files, num_classes = _CIFAR_LAYOUT[kind]
    root = path
    if root.name == folder:  # accept the inner folder too
        root = root.parent
    expected = (f"expected torchvision's {title} format: a folder containing {folder}/ with "
                f"{', '.join(files)} (as written by torchvision.datasets.{title.replace('-', '')}"
                f"(root, download=True))")
    if not path.exists():
        raise DataError(f"{title} data not found: {path} does not exist; {expected}")
    inner = root / folder
    if not inner.is_dir():
        raise DataError(f"{title} data not found in {path}: no {folder}/ folder there; {expected}")
    missing = [f for f in files if not (inner / f).is_file()]
    if missing:
        raise DataError(f"{title} data in {inner} is incomplete: missing {', '.join(missing)}; {expected}")
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else [])
                         + [T.ToTensor(), normalize])
    test_tf = T.Compose([T.ToTensor(), normalize])
    try:
        train_aug = cls(str(root), train=True, transform=train_tf, download=False)
        train_plain = cls(str(root), train=True, transform=test_tf, download=False)
        test = cls(str(root), train=False, transform=test_tf, download=False)
    except Exception as e:  # torchvision: "Dataset not found or corrupted", unpickling errors, ...
        raise DataError(f"{title} data in {inner} is malformed ({type(e).__name__}: {e}); {expected}") from e
    n = len(train_aug)
    val_size = min(5000, n // 10) if val_size is None else val_size
    train_idx, val_idx = _held_out_split(n, val_size, split_seed, title)
    return DataBundle(
        name=kind, spec=f"{kind}:{path}",
        train=Subset(train_aug, train_idx), val=Subset(train_plain, val_idx), test=test,
        num_classes=num_classes, input_size=(3, 32, 32), stem="cifar",
        info={"root": str(root), "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test)}},
    )


# ---------------------------------------------------------------------------------------------
# ImageNet from an ImageFolder root


def load_imagenet_data(path: Path, *, val_size: Optional[int] = None, split_seed: int = 0,
                       augment: bool = True) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    expected = ("expected an ImageFolder root with train/ and val/ subfolders, each holding one folder "
                "per class with the images inside (e.g. train/n01440764/n01440764_10026.JPEG)")
    if not path.exists():
        raise DataError(f"ImageNet data not found: {path} does not exist; {expected}")
    for sub in ("train", "val"):
        if not (path / sub).is_dir():
            raise DataError(f"ImageNet data in {path} is malformed: no {sub}/ folder; {expected}")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose(([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if augment
                          else [T.Resize(256), T.CenterCrop(224)]) + [T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    try:
        train_aug = datasets.ImageFolder(str(path / "train"), transform=train_tf)
        train_plain = datasets.ImageFolder(str(path / "train"), transform=test_tf)
        test = datasets.ImageFolder(str(path / "val"), transform=test_tf)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise DataError(f"ImageNet data in {path} is malformed ({e}); {expected}") from e
    if train_aug.classes != test.classes:
        raise DataError(f"ImageNet data in {path} is malformed: train/ has {len(train_aug.classes)} class "
                        f"folders and val/ has {len(test.classes)}, with different names; {expected}")
    n = len(train_aug)
    val_size = min(50000, n // 10) if val_size is None else val_size
    if val_size < 1:
        raise DataError(f"ImageNet data in {path} has too few training images ({n}) to hold out a validation split")
    train_idx, val_idx = _held_out_split(n, val_size, split_seed, "ImageNet")
    return DataBundle(
        name="imagenet", spec=f"imagenet:{path}",
        train=Subset(train_aug, train_idx), val=Subset(train_plain, val_idx), test=test,
        num_classes=len(train_aug.classes), input_size=(3, 224, 224), stem="imagenet",
        info={"root": str(path), "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test)}},
    )
