"""One writer per cache: `<cache>.lock`, beside the cache folder (so that --overwrite, which replaces the
folder, keeps it), held with an exclusive `flock` for as long as the writer runs.

The kernel drops a `flock` when its process dies, however it dies, so a lock left by a killed writer
is never mistaken for a live one: the file's text (who held it) only explains a refusal, and is
replaced when a new writer takes the lock over.
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
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # unlinked while still held: no other writer can slip in between
        self.handle.close()
        self.handle = None


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
