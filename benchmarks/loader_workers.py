"""Images/s of ffc-train's image loading (decode, resize, flip, collate) per number of DataLoader workers.

    python -m benchmarks.loader_workers [--images 3000] [--size 112] [--workers 0,1,2,4] [--out FILE]

Writes a temporary ImageFolder of JPEGs (smooth random images, as large as a face crop) and the same
images as an insightface RecordIO file, decodes the ImageFolder once into ffc-train's uint8 decode cache
(``--decode-cache``, read in the training process), then, for each source and worker count, times one rank's epoch
of ``RankLoader`` (the loader ffc-train uses, ``--num-workers``) at batch 128. Reports images/s and the
ratio to 0 workers (decoding in the training process) measured in the same run; JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG-encoded ``size x size`` RGB images: low-frequency random colour fields (compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _write_sources(root: Path, images: list[bytes], classes: int):
    from ffc_parallel.data import write_face_recordio

    labels = np.arange(len(images)) % classes
    for i, (data, label) in enumerate(zip(images, labels)):
        folder = root / "folder" / f"id{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)
    (root / "rec").mkdir()
    order = np.argsort(labels, kind="stable")
    write_face_recordio(root / "rec" / "train.rec", [images[i] for i in order], labels[order])


def _epoch_rate(source, workers: int, batch: int) -> float:
    from ffc_parallel.data import RankLoader

    loader = RankLoader(source, batch, 0, 1, seed=0, epoch=0, num_workers=workers)
    start = time.perf_counter()
    count = sum(int(y.numel()) for _, y in loader)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=112, help="stored and decoded image size")
    p.add_argument("--workers", default="0,1,2,4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from ffc_parallel.data import ImageFolder, RecordIOFaces
    from ffc_parallel.data.decoded import DecodedImages

    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ffc_loader_bench_") as tmp:
        root = Path(tmp)
        _write_sources(root, _images(args.images, args.size), classes=max(2, args.images // 20))
        sources = {"imagefolder": ImageFolder(root / "folder", image_size=args.size, channels=3),
                   "recordio": RecordIOFaces(root / "rec", image_size=args.size, channels=3)}
        start = time.perf_counter()
        sources["decoded"] = DecodedImages(sources["imagefolder"], root / "cache")
        build_s = time.perf_counter() - start
        print(f"decode cache: {args.images} images decoded once in {build_s:.1f} s", flush=True)
        for name, source in sources.items():
            _epoch_rate(source, 0, args.batch)   # warm the page cache
            # the decoded array is read in the training process (a vectorised batch): no workers
            rates = {w: _epoch_rate(source, w, args.batch) for w in (workers if name != "decoded" else workers[:1])}
            results[name] = {str(w): {"images_per_s": round(r, 1), "vs_0_workers": round(r / rates[workers[0]], 2)}
                             for w, r in rates.items()}
            print(name, " ".join(f"{w} workers: {r:,.0f} img/s" for w, r in rates.items()), flush=True)
    report = {"command": "python -m benchmarks.loader_workers " + " ".join(argv or []),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "images": args.images, "size": args.size, "batch": args.batch, "decode_cache_build_s": round(build_s, 2),
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
