"""Fault injection for the crash, disk-full and resume tests: environment variables that make a process
fail at a chosen point. Unset (always, outside the tests), every hook does nothing."""
from __future__ import annotations

import errno
import os
import signal

CRASH_AFTER_COMMITS_ENV = "READ_CACHE_CRASH_AFTER_COMMITS"  # SIGKILL the cache writer after N shard commits
CRASH_RANK_ENV = "READ_CACHE_CRASH_RANK"  # under torchrun: only this rank crashes
CRASH_TASK_ENV = "READ_CACHE_CRASH_TASK"  # in a store: only while this task is cached
DISK_FULL_AFTER_ENV = "READ_CACHE_DISK_FULL_AFTER_SHARDS"  # ENOSPC on writing shard file N + 1
CRASH_AFTER_EPOCH_ENV = "READ_TRAIN_CRASH_AFTER_EPOCH"  # SIGKILL train-side once N epochs' state is saved

_shards_written = 0


def _limit(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def after_commit(commits: int, task: str) -> None:
    limit, rank = _limit(CRASH_AFTER_COMMITS_ENV), _limit(CRASH_RANK_ENV)
    if rank is not None and rank != int(os.environ.get("RANK", "0")):
        return
    if os.environ.get(CRASH_TASK_ENV, task) != task:
        return
    if limit and commits >= limit:
        os.kill(os.getpid(), signal.SIGKILL)


def before_shard_write(path) -> None:
    global _shards_written
    limit = _limit(DISK_FULL_AFTER_ENV)
    if limit is not None and _shards_written >= limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    _shards_written += 1


def after_epoch_saved(epochs: int) -> None:
    limit = _limit(CRASH_AFTER_EPOCH_ENV)
    if limit is not None and epochs == limit:
        os.kill(os.getpid(), signal.SIGKILL)
