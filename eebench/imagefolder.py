"""ImageNet-style datasets read from ImageFolder trees, decoded by DataLoader workers.

These datasets are too large to hold in memory, so they keep the classic pipeline: worker processes
decode JPEGs and augment them (``RandomResizedCrop`` + flip for ImageNet, pad-crop + flip for
Tiny-ImageNet), pinned host memory, an asynchronous copy to the device. Workers hand over uint8
tensors; normalisation happens on the device, as for the in-memory datasets.

Determinism: each image's random crop and flip come from a generator seeded by (run seed, epoch,
image index), not from the worker that happens to decode it, so the batches of an epoch are the
same for any number of workers, for any number of DDP processes, and when a run resumes mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import epoch_seed
from .tv import import_torchvision


@dataclass(frozen=True)
class FolderImages:
    """Some images of an ImageFolder tree: their paths, and how to turn them into network inputs.

    Indexing with an index tensor or array selects images (as for a uint8 image tensor).
    """

    paths: np.ndarray  # bytes paths (a numpy array, not a list: forked workers do not copy it)
    size: int  # network input size
    augment: str  # resized_crop (ImageNet) | crop (pad + random crop)
    crop_padding: int = 0
    hflip: bool = True
    workers: int = 4
    mode: str = "RGB"  # PIL mode the images are decoded to: RGB (3 channels) or L (grey, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: torch.Tensor | np.ndarray) -> FolderImages:
        return replace(self, paths=self.paths[np.asarray(index)])

    def train_transform(self):
        t = import_torchvision().transforms
        if self.augment == "resized_crop":
            crop = [t.RandomResizedCrop(self.size)]
        else:
            crop = [t.CenterCrop(self.size), t.RandomCrop(self.size, padding=self.crop_padding)]
        return t.Compose(crop + ([t.RandomHorizontalFlip()] if self.hflip else []) + [t.PILToTensor()])

    def eval_transform(self):
        t = import_torchvision().transforms
        # ImageNet's evaluation protocol: shorter side to 256 (= 224 * 8/7), centre crop 224
        resize = [t.Resize(round(self.size * 8 / 7))] if self.augment == "resized_crop" else []
        return t.Compose(resize + [t.CenterCrop(self.size), t.PILToTensor()])


def scan_folder(root: Path) -> tuple[np.ndarray, torch.Tensor]:
    """(paths, labels) of an ImageFolder tree ``root/<class>/<image>``, classes in sorted order."""
    tv = import_torchvision()
    samples = tv.datasets.ImageFolder(str(root)).samples
    paths = np.array([p.encode() for p, _ in samples])
    return paths, torch.tensor([label for _, label in samples], dtype=torch.long)


class _Decoded(torch.utils.data.Dataset):
    """Image ``i`` of ``images``, transformed under a generator seeded by (``seed``, ``i``)."""

    def __init__(self, images: FolderImages, transform, seed: int | None) -> None:
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.images.paths[i].decode(), "rb") as f:
            image = Image.open(f).convert(self.images.mode)
        if self.seed is None:
            return self.transform(image)
        # torchvision's transforms draw from the global generator: seed it per image, restore after
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            return self.transform(image)


def _loader(dataset: _Decoded, batch_sampler, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    # its own generator: the loader's base seed must not be drawn from the global one, which
    # methods use (a resumed run would otherwise continue with another random stream)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def train_batches(
    images: FolderImages, batches: list[torch.Tensor], seed: int, epoch: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """The augmented uint8 batches of one epoch, ``batches`` being each batch's image indices."""
    dataset = _Decoded(images, images.train_transform(), seed=epoch_seed(seed, epoch))
    sampler = [b.tolist() for b in batches]
    for x in _loader(dataset, sampler, images.workers, device.type == "cuda"):
        yield x.to(device, non_blocking=True)


def eval_batches(images: FolderImages, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 batches of every image in order, resized and centre-cropped."""
    order = torch.arange(len(images))
    sampler = [b.tolist() for b in order.split(batch_size)]
    for x in _loader(
        _Decoded(images, images.eval_transform(), seed=None), sampler, images.workers, device.type == "cuda"
    ):
        yield x.to(device, non_blocking=True)
