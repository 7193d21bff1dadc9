"""Where a cache lives: a local folder, or `s3://bucket/prefix` on any S3-compatible object store.

Object storage goes through obstore (zarr's `ObjectStore`): on the same S3 server it read a cache 1.6x
faster than zarr's fsspec store (s3fs), and it offers conditional PUTs, which the write lock needs
(scripts/bench/scale_out.py). Credentials and the endpoint come from the standard environment
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), so MinIO,
Ceph or a local test server need no code; a plain http:// endpoint is allowed because it says so.

Everything the writer and the checks do beyond zarr's own reads and writes is here: whole-object writes
that appear at once (a rename on disk, a PUT in a bucket), listings with sizes, and removal.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from .errors import CacheError

REMOTE = ("s3://",)
PARTIAL = ".partial"  # the suffix of a file being written on disk (`write`), renamed to its key when whole


def is_remote(where) -> bool:
    return str(where).startswith(REMOTE)


def as_location_arg(where: str | Path) -> str | Path:
    """A command-line path as the rest of the code takes it: s3:// URLs as text, anything else a Path."""
    return str(where) if is_remote(where) else Path(where)


class Location:
    def __init__(self, where: "str | Path | Location"):
        if isinstance(where, Location):
            where = where.url
        self.remote = is_remote(where)
        self.url = str(where).rstrip("/") if self.remote else str(Path(where))
        self._s3 = None

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.url}/{name}" if self.remote else Path(self.url) / name)

    @property
    def path(self) -> Path | str:
        """What messages and manifests show: a Path for a folder, the URL for a bucket."""
        return self.url if self.remote else Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.url.rsplit("/", 1)[0] if self.remote else Path(self.url).parent)

    # -- object storage ------------------------------------------------------------------------------
    def _object_store(self):
        if self._s3 is None:
            try:
                from obstore.store import S3Store
            except ImportError:
                from .errors import UserError

                raise UserError(f"{self.url}: caches on object storage need obstore; "
                                "pip install 'read-side[s3]'") from None

            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
            self._s3 = S3Store.from_url(self.url, client_options={"allow_http": endpoint.startswith("http://")})
        return self._s3

    @contextlib.contextmanager
    def _client(self):
        """(the obstore module, this location's S3 store), turning the store's failures (no such bucket,
        refused credentials, no server) into one line."""
        store = self._object_store()
        import obstore
        from obstore.exceptions import BaseError

        try:
            yield obstore, store
        except (BaseError, OSError) as exc:
            text = str(exc)
            code = re.search(r"<Code>(\w+)</Code>", text)
            reason = code.group(1) if code else text.splitlines()[0][:200]
            raise CacheError(f"{self.url}: the object store refused ({reason}); check the bucket, "
                             "AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID, ...)") from None

    def zarr_store(self, read_only: bool = False):
        if self.remote:
            from zarr.storage import ObjectStore

            return ObjectStore(self._object_store(), read_only=read_only)
        from zarr.storage import LocalStore

        return LocalStore(self.url, read_only=read_only)

    # -- objects below this location, by key ("train/zarr.json") -------------------------------------
    def exists(self, key: str = "zarr.json") -> bool:
        if not self.remote:
            return (Path(self.url) / key).is_file()
        with self._client() as (obstore, store):
            try:
                obstore.head(store, key)
                return True
            except FileNotFoundError:
                return False

    def is_empty(self) -> bool:
        if not self.remote:
            path = Path(self.url)
            return not (path.is_dir() and any(path.iterdir()))
        with self._client() as (obstore, store):
            return not any(batch for batch in obstore.list(store, chunk_size=1))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every object (file) below `prefix`, by key."""
        if not self.remote:
            root = Path(self.url)
            sizes, folder = {}, root / prefix
            for f in folder.rglob("*") if folder.is_dir() else ():
                if f.name.endswith(PARTIAL):  # a write in progress (write's temporary), not yet an object
                    continue
                try:
                    if f.is_file():
                        sizes[str(f.relative_to(root))] = f.stat().st_size
                except FileNotFoundError:  # renamed or removed by another writer while this listed (torchrun)
                    continue
            return sizes
        with self._client() as (obstore, store):
            return {item["path"]: item["size"] for batch in obstore.list(store, prefix=prefix or None)
                    for item in batch}

    def write(self, key: str, parts: list[bytes], before=None) -> None:
        """Write one whole object that appears at once or not at all: on disk a temporary file renamed over
        the target (nothing half-written is left on failure), in a bucket a single PUT. `before(name)` runs
        just before the bytes go (fault injection)."""
        if self.remote:
            if before:
                before(f"{self.url}/{key}")
            with self._client() as (obstore, store):
                obstore.put(store, key, b"".join(parts))
            return
        path = Path(self.url) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}{PARTIAL}")
        try:
            with open(temporary, "wb") as handle:
                if before:
                    before(temporary)
                handle.writelines(parts)
            os.replace(temporary, path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if no object has that name (a conditional PUT); False if one does."""
        with self._client() as (obstore, store):
            from obstore.exceptions import AlreadyExistsError

            try:
                obstore.put(store, key, data, mode="create")
                return True
            except AlreadyExistsError:
                return False

    def read(self, key: str) -> bytes | None:
        if not self.remote:
            path = Path(self.url) / key
            return path.read_bytes() if path.is_file() else None
        with self._client() as (obstore, store):
            try:
                return bytes(obstore.get(store, key).bytes())
            except FileNotFoundError:
                return None

    def delete(self, key: str) -> None:
        if not self.remote:
            (Path(self.url) / key).unlink(missing_ok=True)
            return
        with self._client() as (obstore, store):
            obstore.delete(store, key)

    def remove(self) -> None:
        """Delete everything below this location."""
        if not self.remote:
            shutil.rmtree(self.url, ignore_errors=True)
            return
        keys = list(self.sizes())
        with self._client() as (obstore, store):
            for start in range(0, len(keys), 1000):
                obstore.delete(store, keys[start:start + 1000])
