"""Training throughput (not a test): images/s of training steps next to the data loader's own images/s.

    python benchmarks/bench_training.py                  # CPU: small batch, 224 px, a few steps
    python benchmarks/bench_training.py --device cuda    # GPU: bf16 autocast + channels_last, batch 128

Rows: the loader decoding the real NIH PNGs (PNG -> [0, 1] -> 224 px square, several processes), the loader
serving cached squares with the paper's augmentation (what feeds the GPU during training), and one row per
architecture: full training steps (forward, weighted BCE, backward, Adam) on real images. Writes
benchmarks/results/training.json. Imports only torch / numpy / the project (runs on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr.core.preprocess import PreprocessSpec  # noqa: E402
from cxr.models.architectures import build_model  # noqa: E402
from training.augment import PAPER_AUGMENT  # noqa: E402
from training.data.load import load_dataset  # noqa: E402
from training.losses import WeightedBCE, pos_weight_from_labels  # noqa: E402
from training.sampling import EpochShuffleSampler  # noqa: E402
from training.torch_data import RadiographDataset, build_square_cache, iter_decoded, make_loader  # noqa: E402
from training.trainer import freeze_early_convs  # noqa: E402


def loader_decode_rate(paths: list[Path], size: int, workers: int) -> float:
    """images/s of decoding + resizing the PNGs with ``workers`` processes (one pass, after process start)."""
    t0 = time.perf_counter()
    n = sum(len(chunk) for chunk in iter_decoded(paths, size, workers))
    return n / (time.perf_counter() - t0)


def loader_augment_rate(ds: Any, cache: np.ndarray, size: int, workers: int, batch: int, device: torch.device) -> float:
    """images/s of the training loader from the in-memory cache with augmentation (second epoch, workers warm)."""
    data = RadiographDataset(ds, PreprocessSpec(size=size), PAPER_AUGMENT, 0, cache)
    sampler = EpochShuffleSampler(len(ds))
    loader = make_loader(data, sampler, batch, workers, device)
    for _ in loader:  # warm-up epoch: starts the persistent workers
        pass
    sampler.set_epoch(1)
    t0 = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - t0)


def train_rate(arch: str, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device, amp: bool) -> float:
    """images/s of full training steps of ``arch`` on the batch (x, y) (one warm-up step not timed)."""
    torch.manual_seed(0)
    model = build_model(arch, y.shape[1])
    freeze_early_convs(model, 0.1)
    model = model.to(device).train()
    if amp:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = WeightedBCE(pos_weight_from_labels(y.cpu().numpy())).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def real_batch(ds: Any, cache: np.ndarray, batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch of real normalised images and labels (repeating images when the batch is larger than the data)."""
    idx = np.arange(batch) % len(cache)
    spec = PreprocessSpec(size=size)
    x = torch.from_numpy((cache[idx].astype(np.float32) - spec.mean) / spec.std)[:, None]
    y = torch.from_numpy(np.asarray(ds.labels[idx], dtype=np.float32))
    return x.to(device), y.to(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "nih-cxr14-621")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--archs", nargs="+", default=["densenet121", "efficientnet_b0"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, help="default: 8 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, help="timed steps per architecture (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--images", type=int, default=160, help="images decoded for the loader rows")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training.json")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    batch, steps = args.batch or (128 if cuda else 8), args.steps or (20 if cuda else 3)
    ds = load_dataset(args.data)
    ds = ds.subset(np.arange(min(args.images, len(ds))))
    rows: list[dict[str, Any]] = []
    rate = loader_decode_rate(list(ds.paths), args.size, args.workers)
    rows.append({"what": f"loader: decode PNG -> {args.size} px ({args.workers} workers)", "images_per_s": rate})
    cache = build_square_cache(ds.paths, args.size, args.workers)
    rate = loader_augment_rate(ds, cache, args.size, args.workers, min(batch, 64), device)
    rows.append({"what": f"loader: cached + augment + normalise ({args.workers} workers)", "images_per_s": rate})
    x, y = real_batch(ds, cache, batch, args.size, device)
    for arch in args.archs:
        rate = train_rate(arch, x, y, steps, device, amp=cuda)
        mode = "bf16 + channels_last" if cuda else "float32"
        rows.append({"what": f"train {arch} batch {batch} {args.size} px {mode}", "images_per_s": rate})
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {platform.processor()})",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "steps": steps, "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}, torch {report['torch']}")
    for r in rows:
        print(f"{r['what']:<62} {r['images_per_s']:>10.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
