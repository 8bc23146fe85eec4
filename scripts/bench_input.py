"""Images per second of the input pipeline alone: Grain (PIL in threads or processes) against tf.data.

    python scripts/bench_input.py [--root /tmp/bench_jpegs] [--images 2000] [--resolutions 32,64,224]
                                  [--seconds 8] [--batch 64] [--repeats 2] [--workers 0] [--json out.json]

Writes a folder of JPEGs of varying size (``--images``, 160-640 px a side, smooth random content
with noise, quality 90; once, then reused) and reads its training split through each loader at each
output resolution, without and with RandAugment (2 layers, magnitude 10): decode, inception crop,
resize, flip, (RandAugment), normalise, batch. Nothing runs on an accelerator and nothing trains.
Each (loader, resolution, RandAugment) is timed ``--repeats`` times, the loaders interleaved so that
a busy machine's load hits them alike; the table gives the best and the median. The first batches
(thread start-up, tf.data tracing) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root: str, images: int, seed: int = 0) -> str:
    """root/train/cK/i.jpg (and a small val split), 10 classes, sizes 160-640 px; kept when it exists."""
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(20, images // 20))):
        for i in range(n):
            label = f"c{i % 10}"
            os.makedirs(os.path.join(root, split, label), exist_ok=True)
            w, h = (int(v) for v in rng.integers(160, 641, size=2))
            small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
            pixels = np.clip(base + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, label, f"{i}.jpg"), quality=90)
    open(done, "w").close()
    return root


def data_config(root: str, randaugment: int) -> Any:
    from effnet_jax.configs.default import get_config

    d = get_config().data
    d.name, d.train_split, d.eval_split = f"folder:{root}", "train", "val"
    d.randaugment_layers, d.randaugment_magnitude = randaugment, 10
    return d


def open_source(loader: str, root: str, resolution: int, batch: int, randaugment: int, workers: int,
                threads: int = 0) -> Any:
    data = data_config(root, randaugment)
    if loader == "tf.data":
        from effnet_jax.data import tfds_source

        return tfds_source.create_source(data, resolution, batch, seed=0)
    from effnet_jax.data import grain_source

    return grain_source.folder_source(data, resolution, batch, seed=0, threads=threads,
                                      workers=workers if loader != "grain" else 0)


def images_per_s(source: Any, seconds: float, warmup: int = 2) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) of a fresh training iterator over ``seconds``, after
    ``warmup`` untimed batches. The CPU time is this process's, all threads (Grain's worker processes not
    counted): on a machine busy with other work, a loader with more threads takes a larger share of the
    cores, so the CPU per image says which does less work."""
    it = source.train_batches(0)
    for _ in range(warmup):
        next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += len(b["label"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return n / wall, 1e3 * cpu / n


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("grain", "pillow", "numpy", "tensorflow-cpu", "tensorflow", "tensorflow-datasets", "jax"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/bench_jpegs")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--resolutions", default="32,64,224")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="> 0: also Grain with that many worker processes")
    p.add_argument("--threads", type=int, default=0, help="Grain's threads (0: its default)")
    p.add_argument("--loaders", default="", help="comma-separated subset of grain, grain-mp, tf.data")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = make_folder(args.root, args.images)
    loaders = ["grain"] + (["grain-mp"] if args.workers > 0 else [])
    try:
        import tensorflow_datasets  # noqa: F401

        loaders.append("tf.data")
    except ImportError:
        print("tensorflow-datasets is not installed: Grain only", file=sys.stderr)
    if args.loaders:
        loaders = [x for x in loaders if x in args.loaders.split(",")]
    print(f"# {args.images} JPEGs in {root}, batch {args.batch}, {args.seconds:.0f} s x {args.repeats} per cell, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {versions()}", flush=True)
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        for ra in (0, 2):
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
            sources = {name: open_source(name, root, resolution, args.batch, ra, args.workers, args.threads)
                       for name in loaders}
            for _ in range(args.repeats):
                for name in loaders:
                    runs[name].append(images_per_s(sources[name], args.seconds))
            for name in loaders:
                rates, cpus = [r for r, _ in runs[name]], [c for _, c in runs[name]]
                row = {"loader": name, "resolution": resolution, "randaugment": ra, "best": max(rates),
                       "median": statistics.median(rates), "cpu_ms_per_image": min(cpus),
                       "load": round(os.getloadavg()[0], 1)}
                rows.append(row)
                print(f"{name:8s} {resolution:4d} px  RandAugment {'2x10' if ra else 'off ':4s}  "
                      f"{row['best']:7.0f} img/s best  {row['median']:7.0f} median  "
                      f"{row['cpu_ms_per_image']:6.2f} CPU ms/img  (load {row['load']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                       "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
