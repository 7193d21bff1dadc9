"""`cache-inspect`: what a cache holds, how big it is, and (`--verify`) whether every shard is intact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from .errors import UserError
from .format import MANIFEST_KEY, QUANTIZED, shard_keys, stored_projection, stored_topk
from .reader import CacheReader
from .store import store_manifest, task_caches
from .commands import LOCATION, OneLineCommand


def _kind(path: str) -> str:
    """hidden (with its scales) or attention (self and cross), by array path."""
    return "attention" if "attention" in path.split("/")[1] else "hidden"


def _split_sizes(reader: CacheReader, name: str) -> tuple[int, int, dict[str, int]]:
    """(logical bytes, bytes on disk, bytes on disk per array kind) of a split's backbone arrays."""
    group = reader.root[name]
    present = reader.location.sizes(name)
    logical = disk = 0
    kinds: dict[str, int] = {}
    for path, node in group.members(max_depth=None):
        if "grows_along" in getattr(node, "attrs", {}):
            logical += int(np.prod(node.shape, dtype=np.int64)) * node.dtype.itemsize
            size = sum(present.get(key, 0) for key in shard_keys(node))
            disk += size
            kinds[_kind(path)] = kinds.get(_kind(path), 0) + size
    return logical, disk, kinds


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=LOCATION)
@click.option("--verify", is_flag=True, help="Read every shard and check it against its recorded checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON and nothing else.")
def main(cache: Path, verify: bool, as_json: bool):
    """Print a cache's or a store's manifest, tasks, splits, counts, sizes and compression ratio (a cache
    or store folder, or an exported .h5 file); --verify checks every shard of every task."""
    if isinstance(cache, Path) and cache.is_file():
        _inspect_hdf5(cache, verify, as_json)
        return
    try:
        store = store_manifest(cache)
        tasks = task_caches(cache)
        readers = [CacheReader(path) for _, path in tasks]
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        manifests = {task: r.root.attrs[MANIFEST_KEY] for (task, _), r in zip(tasks, readers)}
        click.echo(json.dumps({"store": store, "tasks": manifests} if store else manifests[tasks[0][0]], indent=2))
        return
    if store:
        click.echo(f"store        {cache}  (store v{store['store_version']}, read-side {store['package_version']}, "
                   f"created {store['created_at']}): {len(tasks)} task(s), {', '.join(t for t, _ in tasks)}")
    for (task, path), reader in zip(tasks, readers):
        if store:
            click.echo(f"\n[{task}]")
        _describe(path, reader)
    if verify:
        _verify(tasks)


def _describe(cache, reader: CacheReader) -> None:
    m = reader.manifest
    b, t = m["backbone"], m["task"]
    click.echo(f"cache        {cache}  (format v{m['format_version']}, read-side {m['package_version']}, "
               f"{'complete' if m.get('complete') else 'INCOMPLETE'}, created {m['created_at']})")
    click.echo(f"backbone     {b['name']} ({b['family']}, {b['init']} weights"
               + (f", seed {b['init_seed']}" if b["init"] == "random" else "")
               + f"): {b['n_layers']}+{b['n_decoder_layers']} layers, d={b['d_model']}, {b['n_heads']} heads")
    click.echo(f"task         {t['name']} v{t['version']} ({t['metric']}), labels {t['label_words'] or 'regression'}")
    click.echo(f"protocol     {m['split_protocol']['name']}, seed {m['split_protocol']['seed']}, "
               f"max_length {m['max_length']}")
    quantized = ", ".join(f"{k} {QUANTIZED[k]}" for k in m.get("quantize", ()))
    click.echo(f"storage      {m['storage_dtype']}" + (f" ({quantized})" if quantized else "")
               + f", attention {m['attention']}"
               + (f" top-{stored_topk(m)} per row ({m['attention_topk']['residual']})" if stored_topk(m) else "")
               + (f", encoder hidden states projected to {stored_projection(m)} PCA dimensions"
                  if stored_projection(m) else "")
               + (f", {m['outliers']['k']} outlier channels per layer kept" if m.get("outliers") else "")
               + f", layers enc {m['layers']['encoder']} "
               f"dec {m['layers']['decoder']}, {m['storage']['compressor']['cname']} shards "
               f"{m['storage']['shard_bytes'] / 2**20:g} MiB")
    total_logical = total_disk = total_tokens = 0
    total_kinds: dict[str, int] = {}
    for name, counts in m["splits"].items():
        if name not in reader.root:
            click.echo(f"  {name:<10} not written")
            continue
        attrs = reader.root[name].attrs
        logical, disk, kinds = _split_sizes(reader, name)
        total_logical, total_disk = total_logical + logical, total_disk + disk
        total_tokens += counts["n_tokens"]
        total_kinds = {k: total_kinds.get(k, 0) + kinds.get(k, 0) for k in {*total_kinds, *kinds}}
        state = "complete" if attrs["complete"] else f"{attrs['committed']}/{attrs['n_examples']} committed"
        click.echo(f"  {name:<10} {counts['n_examples']:>7} examples {counts['n_tokens']:>9} tokens  "
                   f"{disk / 2**20:9.1f} MiB  {disk / max(counts['n_tokens'], 1):8.0f} B/token  "
                   f"compression {logical / max(disk, 1):.2f}x  {state}")
    click.echo(f"  {'total':<10} {total_disk / 2**20:44.1f} MiB  compression {total_logical / max(total_disk, 1):.2f}x")
    click.echo("  per token  " + ", ".join(f"{k} {v / max(total_tokens, 1):.0f} B" for k, v in sorted(total_kinds.items()))
               + " (on disk)")


def _verify(tasks: list[tuple[str, object]]) -> None:
    """Every shard of every task; exit 1 naming each problem (a store's prefixed with its task)."""
    from tqdm.auto import tqdm

    from .verify import RESUMABLE, verify_cache

    problems = []
    with tqdm(unit="shard", desc="verify") as bar:
        for task, path in tasks:
            prefix = f"{task}/" if len(tasks) > 1 else ""
            problems += [prefix + p for p in verify_cache(path, progress=bar.update)]
    damaged = [p for p in problems if not p.endswith(RESUMABLE)]
    for problem in problems:
        click.echo(f"{'CORRUPT' if problem in damaged else 'UNFINISHED'} {problem}")
    if damaged:
        click.echo(f"verify: {len(damaged)} problem(s); re-create the cache (cache-activations --overwrite)",
                   err=True)
    elif problems:
        click.echo(f"verify: the committed shards are intact, but the cache is unfinished; {RESUMABLE}", err=True)
    if problems:
        sys.exit(1)
    click.echo("verify: every shard matches its checksum")


def _inspect_hdf5(path: Path, verify: bool, as_json: bool) -> None:
    import h5py

    from .hdf5 import verify_hdf5

    if not h5py.is_hdf5(path):
        click.echo(f"error: {path} is neither a cache folder nor an HDF5 file", err=True)
        sys.exit(2)
    with h5py.File(path, "r") as h5:
        if MANIFEST_KEY not in h5.attrs:
            click.echo(f"error: {path} is an HDF5 file but not an exported READ cache", err=True)
            sys.exit(2)
        manifest = json.loads(h5.attrs[MANIFEST_KEY])
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    click.echo(f"cache        {path}  (HDF5 export of format v{manifest['format_version']}, "
               f"{path.stat().st_size / 2**20:.1f} MiB)")
    click.echo(f"backbone     {manifest['backbone']['name']}, task {manifest['task']['name']}, splits "
               + ", ".join(f"{k} {v['n_examples']}" for k, v in manifest["splits"].items()))
    if verify:
        problems = verify_hdf5(path)
        for problem in problems:
            click.echo(f"CORRUPT {problem}")
        if problems:
            click.echo(f"verify: {len(problems)} problem(s); export the cache again", err=True)
            sys.exit(1)
        click.echo("verify: every shard matches its checksum")


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", type=LOCATION)
@click.option("--to", "target", required=True, type=click.Path(path_type=Path), help="The .h5 file to write.")
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), default="gzip", show_default=True,
              help="HDF5 filter (both ship with h5py; every chunk also gets a fletcher32 checksum).")
def export(cache, target: Path, compression: str):
    """Write a complete cache into one HDF5 file (same array names, dtypes and manifest)."""
    from .hdf5 import export_hdf5

    if target.exists():
        click.echo(f"error: {target} exists; remove it or choose another --to", err=True)
        sys.exit(2)
    try:
        export_hdf5(cache, target, compression)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"exported {cache} to {target} ({target.stat().st_size / 2**20:.1f} MiB)")


@click.command("import", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--to", "target", required=True, type=click.Path(path_type=Path), help="The cache folder to write.")
def import_(source: Path, target: Path):
    """Write a cache folder back from an exported HDF5 file: the same arrays and shard bytes."""
    from .hdf5 import import_hdf5

    try:
        import_hdf5(source, target)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"imported {source} to {target}")


if __name__ == "__main__":
    main()
