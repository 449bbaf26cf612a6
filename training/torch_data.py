"""Torch datasets over ``LabelledImages``, preprocessing through exactly the shared core:

    cxr.core.preprocess.load_image_file -> resize_square(size) -> [augment, training only] -> normalize(spec)

The resized [0, 1] squares can be cached in memory as float16 (relative error < 5e-4, far below what an 8-bit
radiograph resolves) so that a GPU is not starved by PNG decoding; the cache is filled once, with several decoding
processes, before the training DataLoader forks its workers (which then share it copy-on-write).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxr.core.preprocess import PreprocessSpec, load_image_file, normalize, resize_square
from training.augment import AugmentConfig, augment_seed, augment_square
from training.data.base import LabelledImages

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30


def decode_square(path: str | Path, size: int) -> np.ndarray:
    """Read one radiograph and resize it: -> (size, size) float32 in [0, 1]. Raises what the core raises."""
    return resize_square(load_image_file(path), size)


class _DecodeDataset(Dataset[np.ndarray]):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_square(self.paths[i], self.size).astype(np.float16)


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def iter_decoded(paths: Sequence[Path], size: int, workers: int = 4, batch: int = 32) -> DataLoader:
    """A DataLoader yielding (B, size, size) float16 arrays of decoded squares, in order, with ``workers``
    decoding processes (also what the training benchmark times)."""
    return DataLoader(
        _DecodeDataset(paths, size), batch_size=batch, num_workers=workers, collate_fn=_stack, shuffle=False
    )


def build_square_cache(paths: Sequence[Path], size: int, workers: int = 4) -> np.ndarray:
    """Decode every image once -> (N, size, size) float16 array of [0, 1] squares."""
    cache = np.empty((len(paths), size, size), dtype=np.float16)
    pos = 0
    for chunk in iter_decoded(paths, size, workers):
        cache[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return cache


def cache_fits(n_images: int, size: int, max_bytes: int = DEFAULT_CACHE_BYTES) -> bool:
    """Whether a float16 cache of ``n_images`` squares of ``size`` stays under ``max_bytes``."""
    return n_images * size * size * 2 <= max_bytes


class RadiographDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``i`` (or ``(i, epoch)`` from the samplers in ``training.sampling``) ->
    (x (1, S, S) float32 normalised, y (L,) float32 with NaN = unknown).

    ``augment`` None means evaluation (no augmentation). Augmentation of sample i in epoch e is seeded by
    (seed, e, i) only, so it does not depend on the number of workers or ranks.
    """

    def __init__(
        self,
        images: LabelledImages,
        spec: PreprocessSpec,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache: np.ndarray | None = None,
    ) -> None:
        if cache is not None and cache.shape != (len(images), spec.size, spec.size):
            raise ValueError(f"cache {cache.shape} does not match {len(images)} images of {spec.size} px")
        self.images, self.spec, self.augment, self.seed, self.cache = images, spec, augment, seed, cache
        self.targets = torch.from_numpy(np.asarray(images.labels, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def square(self, i: int) -> np.ndarray:
        """The resized [0, 1] square of image ``i``, float32."""
        if self.cache is not None:
            return self.cache[i].astype(np.float32)
        return decode_square(self.images.paths[i], self.spec.size)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = (item, 0) if isinstance(item, int | np.integer) else item
        sq = self.square(int(i))
        if self.augment is not None:
            sq = augment_square(sq, augment_seed(self.seed, epoch, int(i)), self.augment)
        return torch.from_numpy(normalize(sq, self.spec)), self.targets[int(i)]


def make_loader(
    dataset: RadiographDataset,
    sampler: Sampler | Sequence[int],
    batch_size: int,
    workers: int,
    device: torch.device,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader with the project's settings: ``workers`` processes (persistent), pinned memory on CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=drop_last,
    )


def maybe_cache(
    images: LabelledImages, size: int, workers: int, max_bytes: int = DEFAULT_CACHE_BYTES
) -> np.ndarray | None:
    """A square cache for ``images`` if it fits in ``max_bytes`` (0 disables caching), else None."""
    if max_bytes <= 0 or not cache_fits(len(images), size, max_bytes):
        log.info("not caching %d images at %d px (limit %d bytes)", len(images), size, max_bytes)
        return None
    return build_square_cache(images.paths, size, workers)
