"""Beyond one machine, measured side by side in one run on this machine:

1. caching throughput: `cache-activations` as one process against `torchrun --nproc-per-node 2`;
2. reading a training epoch's windows from a local S3 server (moto, started here) against local disk;
3. the same cache as one HDF5 file (gzip and lzf) against zarr: size and read speed.

    python scripts/bench/scale_out.py --model models/all-MiniLM-L6-v2 --task mrpc --limit 1000 \
        --cache caches/compact/top8+int8+uint8/all-MiniLM-L6-v2/mrpc
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def caching(model: str, task: str, limit: int, data_dir: str, work: Path) -> None:
    args = ["--task", task, "--model", model, "--data-dir", data_dir, "--limit", str(limit), "--splits", "train",
            "--quiet"]
    timed = {}
    for name, launcher in (("1 process", [sys.executable, "-m"]),
                           ("torchrun, 2 ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", "2", "-m"])):
        began = time.perf_counter()
        done = subprocess.run([*launcher, "pipeline.cli", *args, "--out", str(work / name.replace(" ", "_"))],
                              cwd=REPO, capture_output=True, text=True)
        timed[name] = time.perf_counter() - began
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        print(f"caching, {name}: {timed[name]:.1f} s (start-up included): "
              + next(line.strip() for line in done.stdout.splitlines() if "train" in line))
    print(f"caching: 2 ranks / 1 process time = {timed['torchrun, 2 ranks'] / timed['1 process']:.2f}")


def read_epoch(url: str, window: int) -> tuple[float, int]:
    """Seconds to read every backbone array of the train split, window by window (as streaming training
    reads), and the bytes read."""
    from cache_store import CacheReader

    split = CacheReader(url).split("train")
    paths = split.array_paths()
    began, total = time.perf_counter(), 0
    for start in range(0, split.n_examples, window):
        values = split.load_many(paths, start, min(start + window, split.n_examples))
        total += sum(v.numel() * v.element_size() for v in values.values())
    return time.perf_counter() - began, total


def object_storage(cache: Path, window: int, rounds: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        time.sleep(2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        from cache_store.location import Location

        bucket = Location("s3://bench/cache")
        for path in cache.rglob("*"):
            if path.is_file():
                bucket.write(str(path.relative_to(cache)), [path.read_bytes()])
        server_speed(bucket)
        for r in range(rounds):
            disk, nbytes = read_epoch(str(cache), window)
            remote, _ = read_epoch(bucket.url, window)
            print(f"epoch read, round {r}: disk {nbytes / disk / 2**20:.0f} MiB/s, local S3 server "
                  f"{nbytes / remote / 2**20:.0f} MiB/s; S3 / disk time = {remote / disk:.2f}")
            disk, remote = (train_epoch(source, Path(tempfile.mkdtemp())) for source in (str(cache), bucket.url))
            print(f"streaming training epoch (GRU r=144, windows read ahead on a thread), round {r}: disk "
                  f"{disk:.1f} s, local S3 server {remote:.1f} s; S3 / disk time = {remote / disk:.2f}")
    finally:
        server.terminate()


def server_speed(bucket) -> None:
    """What the local S3 server itself delivers: request latency, alone and 50 at once, and a 1 MiB GET."""
    import asyncio

    import obstore

    bucket.write("probe", [bytes(1 << 20)])
    store = bucket._object_store()
    began = time.perf_counter()
    for _ in range(50):
        obstore.get_range(store, "probe", start=0, length=65536)
    alone = (time.perf_counter() - began) / 50

    async def together():
        await asyncio.gather(*(obstore.get_range_async(store, "probe", start=0, length=65536) for _ in range(50)))

    began = time.perf_counter()
    asyncio.run(together())
    concurrent = (time.perf_counter() - began) / 50
    began = time.perf_counter()
    for _ in range(10):
        obstore.get(store, "probe").bytes()
    print(f"S3 server: {alone * 1e3:.1f} ms per 64 KiB range GET one at a time, {concurrent * 1e3:.1f} ms each "
          f"50 at once; 1 MiB GETs at {10 / (time.perf_counter() - began):.0f} MiB/s")
    bucket.delete("probe")


def train_epoch(source: str, out: Path) -> float:
    """Seconds of one training epoch streamed from `source` (a 64 MiB budget: windows, not the whole split)."""
    from side_train.config import grid
    from side_train.train import train

    results = train(source, grid(["gru"], [144], [1e-3], [0], epochs=1), out, device="cpu", progress=False,
                    log=lambda line: None, memory_bytes=64 * 2**20)
    return results[0]["sweep_epoch_seconds"][0]


def hdf5(cache: Path, work: Path, rounds: int) -> None:
    import h5py
    import zarr

    from cache_store.hdf5 import export_hdf5

    zarr_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    files = {}
    for compression in ("gzip", "lzf"):
        files[compression] = work / f"cache-{compression}.h5"
        began = time.perf_counter()
        export_hdf5(cache, files[compression], compression)
        print(f"hdf5 {compression}: {files[compression].stat().st_size / zarr_bytes:.2f}x zarr's bytes "
              f"({zarr_bytes / 2**20:.0f} MiB), exported in {time.perf_counter() - began:.1f} s")
    group = zarr.open_group(str(cache / "train"), mode="r")
    paths = [p for p, n in group.members(max_depth=None) if isinstance(n, zarr.Array) and "grows_along" in n.attrs]
    for r in range(rounds):
        began = time.perf_counter()
        for p in paths:
            group[p][...]
        zarr_s = time.perf_counter() - began
        line = []
        for compression, path in files.items():
            with h5py.File(path, "r") as h5:
                began = time.perf_counter()
                for p in paths:
                    h5[f"train/{p}"][...]
                line.append(f"{compression} {(time.perf_counter() - began) / zarr_s:.2f}")
        with h5py.File(files["lzf"], "r") as h5:  # HDF5's global lock: do two threads read faster?
            began = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda p: h5[f"train/{p}"][...], paths))
            line.append(f"lzf with 2 threads {(time.perf_counter() - began) / zarr_s:.2f}")
        print(f"hdf5 read of the train split, round {r}: time / zarr's = " + ", ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--cache", type=Path, required=True, help="An existing cache to read and export.")
    parser.add_argument("--window", type=int, default=256, help="Examples per read, as streaming training reads.")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        caching(args.model, args.task, args.limit, args.data_dir, Path(work))
        object_storage(args.cache, args.window, args.rounds)
        hdf5(args.cache, Path(work), args.rounds)


if __name__ == "__main__":
    main()
