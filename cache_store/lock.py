"""One writer per cache: `<cache>.lock`, beside the cache (so that --overwrite, which replaces the
cache, keeps it).

On disk it is held with an exclusive `flock` for as long as the writer runs. The kernel drops a `flock`
when its process dies, however it dies, so a lock left by a killed writer is never mistaken for a live
one: the file's text (who held it) only explains a refusal, and is replaced when a new writer takes the
lock over.

In a bucket (`ObjectLock`) it is an object created with a conditional PUT (If-None-Match), which the
store grants to one writer only. Nothing drops it when its writer dies, so a new writer takes it over
only when it names a process of this host that no longer runs; any other holder is refused with the
object's name, to delete once that writer is known to be gone.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from .errors import CacheError


class WriteLock:
    def __init__(self, cache_dir: Path):
        self.path = Path(f"{Path(cache_dir)}.lock")
        self.handle = None
        self.took_over: str | None = None  # who held a stale lock that was taken over

    def __enter__(self) -> "WriteLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _parse(handle.read())
                handle.close()
                raise CacheError(f"{self.path.with_suffix('')} is being written by {_describe(holder)}; "
                                 "wait for it to finish, or stop it, then run again (with --resume to continue "
                                 "its work)") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()  # the holder unlinked this file as it finished: lock the new one
        handle.seek(0)
        stale = _parse(handle.read())  # text without a live flock: its writer died
        if stale:
            self.took_over = f"took over the lock of {_describe(stale)}, which is no longer running"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # unlinked while still held: no other writer can slip in between
        self.handle.close()
        self.handle = None


class ObjectLock:
    def __init__(self, cache):
        from .location import Location

        cache = Location(cache)
        self.folder, self.key = cache.parent, f"{cache.name}.lock"
        self.took_over: str | None = None

    def __enter__(self) -> "ObjectLock":
        mine = json.dumps(_holder()).encode()
        while not self.folder.create(self.key, mine):
            holder = _parse((self.folder.read(self.key) or b"").decode())
            if not _dead_here(holder):
                raise CacheError(f"{self.folder}/{self.key.removesuffix('.lock')} is being written by "
                                 f"{_describe(holder)}; wait for it to finish, or once it is known to be gone "
                                 f"delete {self.folder}/{self.key} and run again (with --resume to continue its work)")
            self.folder.delete(self.key)
            self.took_over = f"took over the lock of {_describe(holder)}, which is no longer running"
        return self

    def __exit__(self, *exc) -> None:
        self.folder.delete(self.key)


def write_lock(cache) -> "WriteLock | ObjectLock":
    """The lock for a cache folder or a cache in a bucket."""
    from .location import is_remote

    return ObjectLock(cache) if is_remote(cache) else WriteLock(cache)


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _dead_here(holder: dict) -> bool:
    """Whether `holder` is a process of this host that has exited."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return False
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's
        pass
    return False


def _parse(text: str) -> dict:
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable": text[:80]}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "another process"
    return (f"process {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"(`{holder.get('command', '?')}`)")
