"""Batch augmentations, vectorized over the batch (one gather per call, no per-example Python loop).

- ``crop_flip`` (images, (N, C, H, W)): zero-pad by ``padding`` (4) pixels, take a random H x W crop and
  flip it horizontally with probability 1/2: the standard CIFAR augmentation (He et al. 2016,
  torchvision ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``).
- ``shift`` (1-D signals, (N, C, L)): the same random crop in 1-D, i.e. a random translation by up to
  ``padding`` positions with zero fill; no flip (a reversed signal is another signal).

Each has a pure form taking the drawn offsets (``crop_flip_at``, ``shift_at``) and a random form taking a
``torch.Generator`` (CPU; the draws move to the batch's device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from normlab.errors import NormlabError

PADDING = 4


def crop_flip_at(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop example i of x (N, C, H, W), zero-padded by ``padding``, at (top[i], left[i]) (offsets into the
    padded image, in [0, 2 * padding]) and mirror it horizontally where flip[i]."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)
    base = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - base, base)
    # One gather over the flattened padded image (3x faster on CPU than gathering rows, then columns).
    index = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    out = padded.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


def shift_at(x: torch.Tensor, offset: torch.Tensor, padding: int) -> torch.Tensor:
    """Window example i of x (N, C, L), zero-padded by ``padding``, starting at offset[i] in [0, 2*padding]:
    the signal moves by ``padding - offset[i]`` positions."""
    n, c, length = x.shape
    padded = F.pad(x, (padding, padding))
    index = offset[:, None] + torch.arange(length, device=x.device)
    return padded.gather(2, index[:, None, :].expand(n, c, length))


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip of a batch of images (N, C, H, W)."""
    if x.dim() != 4:
        raise NormlabError(
            f"crop_flip needs images (N, C, H, W), got shape {tuple(x.shape)}; use 'shift' for 1-D"
        )
    n = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return crop_flip_at(x, top, left, flip, padding)


def shift(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Random translation by up to ``padding`` positions (zero fill) of a batch of signals (N, C, L)."""
    if x.dim() != 3:
        raise NormlabError(
            f"shift needs 1-D signals (N, C, L), got shape {tuple(x.shape)}; use 'crop_flip' for images"
        )
    offset = torch.randint(0, 2 * padding + 1, (x.shape[0],), generator=generator).to(x.device)
    return shift_at(x, offset, padding)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "crop_flip": crop_flip,
    "shift": shift,
}


def get_augmentation(name: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if name not in AUGMENTATIONS:
        raise NormlabError(f"unknown augment {name!r}; valid: {', '.join(sorted(AUGMENTATIONS))} or None")
    return AUGMENTATIONS[name]
