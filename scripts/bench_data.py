"""Side-by-side benchmark of the image preprocessing pipeline: lora-data (Rust) vs a
kohya-style PIL + numpy baseline doing the same work.

Work per image (both sides): decode the JPEG, pick kohya's bucket for a 1024x1024 resolution
(256..2048, steps of 64), resize with Lanczos to cover it (PIL `Image.LANCZOS`; Rust:
fast_image_resize Lanczos3), centre-crop to the bucket, normalise to float32 CHW in [-1, 1].
(kohya itself would use cv2 INTER_AREA when shrinking; both sides use Lanczos here so the work
is the same.)

The workload: 24 JPEGs (quality 90) of 1200-2000 px, made from the public-domain photos in
lora-data/tests/data/10_photo, written to a temporary folder.

Run from the repository root (builds the Rust side in release mode first):

    source scripts/env.sh && python scripts/bench_data.py [--passes 3] [--threads 2]

Prints images/s for Python (1 process and a pool of --threads processes) and Rust (--threads
rayon threads), and the ratio.
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "lora-data", "tests", "data", "10_photo")


def make_bucket_resolutions(max_reso, min_size, max_size, divisible):
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


BUCKETS = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
ARS = np.array([w / h for w, h in BUCKETS])


def select_bucket(w, h):
    ar = w / h
    reso = (w, h) if (w, h) in BUCKETS else BUCKETS[np.abs(ARS - ar).argmin()]
    scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
    return reso, (int(w * scale + 0.5), int(h * scale + 0.5))


def process(path):
    with Image.open(path) as im:
        im = im.convert("RGB")
        bucket, resized = select_bucket(*im.size)
        im = im.resize(resized, Image.LANCZOS)
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    left, top = (w - bucket[0]) // 2, (h - bucket[1]) // 2
    arr = arr[top : top + bucket[1], left : left + bucket[0]]
    x = (arr.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def make_workload(out_dir, n=24):
    srcs = sorted(f for f in os.listdir(PHOTOS) if not f.endswith(".txt"))
    sizes = [(2000, 1333), (1333, 2000), (1600, 1600), (1920, 1080), (1200, 1800), (1800, 1200)]
    paths = []
    for i in range(n):
        with Image.open(os.path.join(PHOTOS, srcs[i % len(srcs)])) as im:
            im = im.convert("RGB").resize(sizes[i % len(sizes)], Image.BICUBIC)
        p = os.path.join(out_dir, f"img_{i:03d}.jpg")
        im.save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def bench_python(paths, passes, procs):
    for p in paths:  # warm-up (page cache)
        process(p)
    start = time.perf_counter()
    if procs <= 1:
        for _ in range(passes):
            for p in paths:
                process(p)
    else:
        with mp.Pool(procs) as pool:
            for _ in range(passes):
                for _ in pool.imap_unordered(process, paths, chunksize=2):
                    pass
    return len(paths) * passes / (time.perf_counter() - start)


def bench_rust(folder, passes, threads):
    cmd = ["cargo", "run", "--quiet", "--release", "-p", "lora-data", "--example", "bench_pipeline", "--",
           folder, "1024", str(passes), str(threads)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("building the Rust side (release)...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "lora-data", "--example", "bench_pipeline"],
                   cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_workload(tmp)
        py1 = bench_python(paths, args.passes, 1)
        pyn = bench_python(paths, args.passes, args.threads)
        rs = bench_rust(tmp, args.passes, args.threads)
    rows = [
        ("python PIL+numpy, 1 process", py1),
        (f"python PIL+numpy, {args.threads} processes", pyn),
        (f"lora-data, {args.threads} rayon threads", rs["images_per_s"]),
    ]
    print(f"{len(paths)} images x {args.passes} passes, 1024x1024 buckets, Lanczos")
    for name, v in rows:
        print(f"  {name:<36} {v:8.1f} images/s")
    print(f"  ratio lora-data / best python: {rs['images_per_s'] / max(py1, pyn):.2f}x")


if __name__ == "__main__":
    main()
