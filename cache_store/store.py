"""A store: several tasks cached from one backbone, in one folder with one store manifest.

    <store>/                      attrs["read_store"]: the store manifest: store_version, created_at,
                                  package_version, tasks (in caching order) and SHARED_FIELDS: backbone,
                                  tokenizer, max_length, batch_size, storage_dtype, quantize, attention,
                                  attention_topk, layers, storage
      <task>/                     one task's cache in the single-task format (cache_store/__init__.py),
                                  e.g. sst2/train/encoder/hidden/0; its manifest holds the task, its split
                                  protocol and its task version, and repeats SHARED_FIELDS
      <task>/ ...

Every task's repeated SHARED_FIELDS must equal the store manifest's: the writer refuses to add a task of
another backbone or other storage settings, and every reader refuses a store whose task disagrees, so a
store cannot disagree with itself about its backbone. The repetition keeps each task readable, verifiable
and exportable on its own (`CacheReader(store / task)`, `cache-inspect store/task`). A single-task cache
(a folder with attrs["read_cache"]) reads as a store of that one task.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping

import zarr

from .errors import CacheError
from .format import MANIFEST_KEY, differences
from .location import Location

STORE_KEY = "read_store"
STORE_VERSION = 1
SHARED_FIELDS = ("backbone", "tokenizer", "max_length", "batch_size", "storage_dtype", "quantize", "attention",
                 "attention_topk", "layers", "storage")
# The paper's GLUE benchmark (its seven tasks): `cache-activations --task glue`.
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli")


def shared_fields(manifest: Mapping[str, Any]) -> dict:
    """What every task of a store has in common: the backbone and the storage choices."""
    return {key: manifest.get(key) for key in SHARED_FIELDS}


def _attrs(location: Location) -> Mapping[str, Any] | None:
    if not location.exists("zarr.json"):
        return None
    return zarr.open_group(location.zarr_store(read_only=True), mode="r").attrs


def store_manifest(path) -> dict | None:
    """The store manifest at `path`, or None when `path` holds no store."""
    attrs = _attrs(Location(path))
    return dict(attrs[STORE_KEY]) if attrs is not None and STORE_KEY in attrs else None


def backbone_folder(path) -> str:
    """The <model> of caches/<model>/<task>, of a store caches/<model>/<store> and of a task inside one,
    caches/<model>/<store>/<task>: the name train-side gives its runs' folder."""
    parent = Location(path).parent
    return parent.parent.name if store_manifest(parent) is not None else parent.name


def task_caches(path, tasks: list[str] | None = None) -> list[tuple[str, str | Path]]:
    """(task, cache path) for each of `tasks` (default: all) in the store at `path`, in the store's order,
    after checking that each task agrees with the store manifest; a single-task cache gives itself."""
    location = Location(path)
    attrs = _attrs(location)
    if attrs is None:
        raise CacheError(f"no cache at {location.path}; create one with `cache-activations --task TASK`")
    if STORE_KEY not in attrs:
        if MANIFEST_KEY not in attrs:
            raise CacheError(f"{location.path} is a zarr group but not a READ cache (no manifest)")
        task = attrs[MANIFEST_KEY]["task"]["name"]
        if tasks and tasks != [task]:
            raise CacheError(f"{location.path} holds task {task} only, not {', '.join(tasks)}")
        return [(task, location.path)]
    store = attrs[STORE_KEY]
    held = list(store["tasks"])
    missing = [t for t in tasks or () if t not in held]
    if missing:
        raise CacheError(f"the store {location.path} has no task {', '.join(missing)} (it holds {', '.join(held)}); "
                         f"add it with `cache-activations --task {','.join(missing)} --store {location.name} --add`")
    out = []
    for task in [t for t in held if not tasks or t in tasks]:
        where = location / task
        theirs = _attrs(where)
        if theirs is None or MANIFEST_KEY not in theirs:
            raise CacheError(f"the store {location.path} lists task {task} but holds no cache of it; finish it "
                             "with `cache-activations ... --resume`")
        diffs = differences(shared_fields(theirs[MANIFEST_KEY]), shared_fields(store))
        if diffs:
            raise CacheError(f"task {task} of the store {location.path} disagrees with the store's manifest ("
                             + "; ".join(diffs[:3]) + "); re-create that task")
        out.append((task, where.path))
    return out


class StoreWriter:
    """Opens a store for caching tasks into it. `mode`: new (refuse an existing store), resume or add
    (continue one; add: it must exist), overwrite (replace it). `shared` is the run's SHARED_FIELDS: a
    store made with others is refused, naming what differs."""

    def __init__(self, path, shared: Mapping[str, Any], mode: str, package_version: str):
        self.location = Location(path)
        self.path = self.location.path
        if mode == "overwrite":
            self.location.remove()
        attrs = _attrs(self.location)
        if attrs is not None and STORE_KEY not in attrs:
            raise CacheError(f"{self.path} holds a single-task cache, not a store; choose another --store")
        existing = dict(attrs[STORE_KEY]) if attrs is not None else None
        if existing is None and mode == "add":
            raise CacheError(f"no store at {self.path} to add to; create it without --add")
        if existing is not None and mode == "new":
            raise CacheError(f"{self.path} already holds a store; pass --add or --resume to cache more tasks into "
                             "it, or --overwrite to replace it")
        if existing is None and mode == "new" and not self.location.is_empty():
            raise CacheError(f"{self.path} exists and is not empty; choose another --store or pass --overwrite")
        if existing is not None:
            diffs = differences(shared_fields(existing), dict(shared))
            if diffs:
                raise CacheError(f"cannot cache into {self.path}: it was made with another backbone or other "
                                 "settings (" + "; ".join(diffs[:4]) + "); use another --store")
        self.manifest = existing or {
            "store_version": STORE_VERSION, "package_version": package_version, "tasks": [],
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **shared}
        self.root = zarr.open_group(self.location.zarr_store(), mode="a")
        self._save()

    def add_task(self, task: str) -> str | Path:
        """Lists `task` in the store (before its cache is written) and returns where its cache goes."""
        if task not in self.manifest["tasks"]:
            self.manifest["tasks"] = [*self.manifest["tasks"], task]
            self._save()
        return (self.location / task).path

    def _save(self) -> None:
        self.root.attrs[STORE_KEY] = self.manifest
