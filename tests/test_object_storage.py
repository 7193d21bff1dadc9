"""Caches in an S3 bucket, against a real S3 API server (moto's, started here on 127.0.0.1) reached only
through the standard AWS environment variables: write, verify, train, a killed writer resumed, a second
writer refused, and a corrupted object found."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import arrays_of, cache_args
from cache_store import CacheError, CacheReader, verify_cache
from cache_store.cli import export, import_
from cache_store.cli import main as inspect_main
from cache_store.faults import CRASH_AFTER_COMMITS_ENV
from cache_store.location import Location
from pipeline.cli import main as cache_main
from side_train.cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
SMALL_SHARDS = ["--shard-mb", "0.01"]


# The server binds a port of the kernel's choosing itself and prints it once it listens: no port is probed
# and released for another process to take first.
SERVER = ("from moto.server import ThreadedMotoServer; import threading; "
          "server = ThreadedMotoServer('127.0.0.1', 0, verbose=False); server.start(); "
          "print(server.get_host_and_port()[1], flush=True); threading.Event().wait()")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, with a bucket; the AWS_* variables point at it meanwhile."""
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    saved = {}
    try:
        port = int(server.stdout.readline())  # the server is listening once it has said where
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="caches")
        yield "s3://caches"
    finally:
        server.kill()
        server.wait(10)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def remote_arrays(url: str) -> dict:
    root = zarr.open_group(Location(url).zarr_store(read_only=True), mode="r")
    return {p: node[...] for p, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_arrays(url: str, local: Path) -> None:
    ours, theirs = remote_arrays(url), arrays_of(local)
    assert ours.keys() == theirs.keys()
    for path in theirs:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


@pytest.fixture(scope="module")
def local_cache(tiny_bert, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    assert CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, out, *SMALL_SHARDS)).exit_code == 0
    return out / tiny_bert.name / "rte"


def test_cache_verify_and_train_from_a_bucket(s3, tiny_bert, glue_dir, local_cache, tmp_path):
    result = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, f"{s3}/write", *SMALL_SHARDS))
    assert result.exit_code == 0, result.output
    url = f"{s3}/write/{tiny_bert.name}/rte"
    assert f"cache: {url}" in result.output
    assert_same_arrays(url, local_cache)
    assert not Location(f"{s3}/write/{tiny_bert.name}").exists("rte.lock")  # released
    inspected = CliRunner().invoke(inspect_main, [url, "--verify"])
    assert inspected.exit_code == 0 and "every shard matches" in inspected.output, inspected.output
    # moved out of the bucket as one HDF5 file, and back into a folder: the same arrays
    exported = CliRunner().invoke(export, [url, "--to", str(tmp_path / "rte.h5")])
    assert exported.exit_code == 0, exported.output
    assert CliRunner().invoke(import_, [str(tmp_path / "rte.h5"), "--to", str(tmp_path / "back")]).exit_code == 0
    assert_same_arrays(str(tmp_path / "back"), local_cache)
    metrics = []
    for source, out in ((url, tmp_path / "remote"), (str(local_cache), tmp_path / "local")):
        trained = CliRunner().invoke(train_main, ["--from-cache", source, "--out", str(out), "--epochs", "2",
                                                  "--quiet"])
        assert trained.exit_code == 0, trained.output
        (found,) = out.rglob("metrics.json")
        metrics.append((json.loads(found.read_text()), (found.parent / "model.safetensors").read_bytes()))
    (remote, remote_weights), (local, local_weights) = metrics
    assert remote["validation"] == local["validation"] and remote["test"] == local["test"]
    assert remote_weights == local_weights


def test_killed_writer_resumes_and_a_second_writer_is_refused(s3, tiny_bert, glue_dir, local_cache):
    args = cache_args(tiny_bert, glue_dir, f"{s3}/kill", *SMALL_SHARDS)
    killed = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, CRASH_AFTER_COMMITS_ENV: "3"}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    url = f"{s3}/kill/{tiny_bert.name}/rte"
    folder = Location(f"{s3}/kill/{tiny_bert.name}")
    stale = folder.read("rte.lock")  # nothing removes a dead writer's lock object
    assert json.loads(stale)["host"] == socket.gethostname()
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(url).split("train")
    # Held by a writer of another host: refused, naming the object to delete once that writer is gone.
    folder.delete("rte.lock")
    assert folder.create("rte.lock", json.dumps({"pid": os.getpid(), "host": "elsewhere"}).encode())
    refused = CliRunner().invoke(cache_main, [*args, "--resume"])
    assert refused.exit_code == 2 and "rte.lock" in refused.output and "elsewhere" in refused.output
    # Held by a process of this host that no longer runs (the killed writer): taken over.
    folder.delete("rte.lock")
    assert folder.create("rte.lock", stale)
    resumed = CliRunner().invoke(cache_main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "took over the lock" in resumed.output
    assert_same_arrays(url, local_cache)
    assert verify_cache(url) == []


def test_a_corrupted_object_is_found(s3, tiny_bert, glue_dir):
    args = cache_args(tiny_bert, glue_dir, f"{s3}/corrupt", *SMALL_SHARDS, "--splits", "validation")
    assert CliRunner().invoke(cache_main, args).exit_code == 0
    url = f"{s3}/corrupt/{tiny_bert.name}/rte"
    cache = Location(url)
    key = sorted(k for k in cache.sizes("validation/encoder/hidden/1") if "/c/" in k)[0]
    data = bytearray(cache.read(key))
    data[len(data) // 3] ^= 0xFF
    cache.write(key, [bytes(data)])
    inspected = CliRunner().invoke(inspect_main, [url, "--verify"])
    assert inspected.exit_code == 1 and "CORRUPT" in inspected.output and "encoder/hidden/1" in inspected.output
    split = CacheReader(url).split("validation")
    with pytest.raises(CacheError, match="corrupted"):
        split.load("encoder/hidden/1")
    cache.delete(key)
    with pytest.raises(CacheError, match="missing"):
        CacheReader(url).split("validation")


def test_a_missing_bucket_is_refused_in_one_line(s3, tiny_bert, glue_dir):
    result = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, "s3://no-such-bucket/x"))
    assert result.exit_code == 2 and "NoSuchBucket" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_store_in_a_bucket_equals_the_local_store_and_trains(s3, tiny_bert, glue_dir, tmp_path):
    """`--task sst2,rte` into a bucket: the same arrays as the local store, inspected, and trained from
    with --multi-task."""
    args = ["--task", "sst2,rte", *SMALL_SHARDS]
    for out in (f"{s3}/stores", tmp_path):
        result = CliRunner().invoke(cache_main, cache_args(tiny_bert, glue_dir, out, *args))
        assert result.exit_code == 0, result.output
    url = f"{s3}/stores/{tiny_bert.name}/sst2+rte"
    assert_same_arrays(url, tmp_path / tiny_bert.name / "sst2+rte")
    inspected = CliRunner().invoke(inspect_main, [url, "--verify"])
    assert inspected.exit_code == 0 and "2 task(s), sst2, rte" in inspected.output, inspected.output
    trained = CliRunner().invoke(train_main, ["--multi-task", "--from-cache", url, "--out", str(tmp_path / "runs"),
                                              "--epochs", "1", "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "runs" / f"{tiny_bert.name}-sst2+rte").is_dir()
