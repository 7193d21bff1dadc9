"""`cache-activations`: parse, build the config, run. Nothing else lives here."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from cache_store import STORAGE_DTYPES, UserError
from cache_store.commands import LOCATION, OneLineCommand, field_option
from cache_store.format import METRIC_NAMES
from cache_store.store import GLUE_TASKS

from .backbones import INITS
from .config import LAYER_CHOICES, CacheConfig
from .errors import InputError
from .tasks import TASKS
from .user_data import read_task_file


def _layer_list(value: str, name: str) -> tuple[int, ...] | str:
    if value in LAYER_CHOICES:
        return value
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise InputError(f"{name} must be 'read', 'all' or comma-separated integers, got {value!r}") from None


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _task_list(value: str, data: tuple[str, ...] = ()) -> list[str]:
    """--task: one name, several comma-separated, or glue; each from the task registry, none twice. With
    --data: the one name of the user's task."""
    if data:
        if "," in value or value == "glue":
            raise InputError("--data describes one task: give --task one name for it")
        return [value]
    names = list(GLUE_TASKS) if value == "glue" else [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise InputError(f"unknown task {', '.join(unknown) or repr(value)}; choose from {', '.join(TASKS)}, "
                         "several comma-separated, or glue")
    if len(set(names)) != len(names):
        raise InputError(f"--task names a task twice: {value}")
    return names


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--task", "tasks", default=None, metavar="TASK[,TASK...]|glue",
              help=f"GLUE task(s): one of {', '.join(TASKS)}; several, comma-separated, or glue (the paper's "
                   f"{len(GLUE_TASKS)}: {','.join(GLUE_TASKS)}) go to one store. With --data: your task's name.")
@click.option("--task-file", type=click.Path(path_type=Path), default=None,
              help="Your task described in a TOML (or .json) file: name, data, text_fields, label_field, metric, "
                   "labels (the options of the same names override it; data paths are relative to the file).")
@click.option("--store", default=None, help="Cache into the store OUT/<model>/STORE, one subgroup per task "
                                            "(default with several tasks: glue, or the tasks joined by +).")
@field_option(CacheConfig, "model")
@field_option(CacheConfig, "name")
@field_option(CacheConfig, "init", type=click.Choice(INITS))
@field_option(CacheConfig, "seed", type=int)
@field_option(CacheConfig, "data_dir", type=click.Path(path_type=Path))
@field_option(CacheConfig, "data", multiple=True, default=(), show_default=False, metavar="FILE|SPLIT=FILE|HUB_ID")
@field_option(CacheConfig, "text_fields", default=None, metavar="COLUMN[,COLUMN]")
@field_option(CacheConfig, "label_field")
@field_option(CacheConfig, "metric", type=click.Choice(METRIC_NAMES))
@field_option(CacheConfig, "labels", default=None, metavar="LABEL,LABEL[,...]")
@field_option(CacheConfig, "out", type=LOCATION)
@field_option(CacheConfig, "splits")
@field_option(CacheConfig, "batch_size", type=int)
@field_option(CacheConfig, "max_length", type=int)
@field_option(CacheConfig, "dtype", type=click.Choice(list(STORAGE_DTYPES)))
@field_option(CacheConfig, "attention", metavar="heads|mean|none|topk:K")
@field_option(CacheConfig, "quantize")
@field_option(CacheConfig, "outliers", type=int)
@field_option(CacheConfig, "project", type=int)
@field_option(CacheConfig, "project_from", type=LOCATION)
@field_option(CacheConfig, "layers", metavar="read|all|K[,K...]")
@field_option(CacheConfig, "limit", type=int)
@field_option(CacheConfig, "device")
@field_option(CacheConfig, "codec", metavar="lz4|zstd[:LEVEL]")
@field_option(CacheConfig, "shard_mb", type=float)
@click.option("--resume", is_flag=True, help="Continue a killed run (in a store: and cache tasks it lacks).")
@click.option("--add", is_flag=True, help="Cache the tasks an existing --store lacks (same backbone and settings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def main(ctx, tasks, task_file, store, model, name, init, seed, data_dir, data, text_fields, label_field, metric, labels, out, splits, batch_size, max_length, dtype, attention, quantize,
         outliers, project, project_from, layers, limit, device, codec, shard_mb, resume, add, overwrite, quiet):
    """Run a frozen backbone once over every split of one or more GLUE tasks, or of your own labelled
    rows (--data), and cache its activations (several tasks: one store, with one subgroup per task)."""
    from .job import run, run_store  # heavy imports (torch, transformers) only once the arguments are fine
    from cache_store.runtime import keep_freed_memory

    keep_freed_memory()

    try:
        if task_file is not None:  # what the command line gives wins over the file
            given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
            described = read_task_file(task_file)
            tasks = tasks or described.get("name")
            data = data if given("data") else described.get("data", data)
            text_fields = text_fields if given("text_fields") else ",".join(described.get("text_fields", ())) or text_fields
            label_field = label_field if given("label_field") else described.get("label_field", label_field)
            metric = metric if given("metric") else described.get("metric", metric)
            labels = labels if given("labels") else ",".join(described.get("labels", ())) or labels
            if not data:
                raise InputError(f"--task-file {task_file} has no data, and no --data was given")
        if not tasks:
            raise InputError("give --task (a GLUE task, or your task's name with --data), or --task-file")
        names = _task_list(tasks, data)
        if sum((resume, overwrite, add)) > 1:
            raise InputError("--resume, --add and --overwrite exclude each other")
        if store is None and len(names) > 1:
            store = "glue" if tasks == "glue" else "+".join(names)
        configs = [CacheConfig(
            task=task, store=store, model=model, name=name, init=init, seed=seed, data_dir=data_dir, data=tuple(data),
            text_fields=_names(text_fields), label_field=label_field, metric=metric, labels=_names(labels), out=out,
            splits=tuple(s for s in splits.split(",") if s), batch_size=batch_size, max_length=max_length,
            dtype=dtype, attention=attention, quantize=tuple(sorted({k for k in quantize.split(",") if k and k != "none"})), outliers=outliers, project=project, project_from=project_from,
            layers=_layer_list(layers, "--layers"), limit=limit, device=device,
            mode="resume" if resume else "add" if add else "overwrite" if overwrite else "new", shard_mb=shard_mb,
            codec=codec,
        ) for task in names]
        config = configs[0]
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        reports = run_store(configs, not quiet, log) if store else run(config, not quiet, log)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # writing failed (input and model problems are InputErrors by now)
        hint = "free some space, then " if exc.errno == errno.ENOSPC else ""
        click.echo(f"error: could not write {exc.filename or config.cache_dir}: {exc.strerror}. Every shard "
                   f"committed before it is intact; {hint}run the same command with --resume to finish", err=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")):  # under torchrun rank 0 reports for all
        return
    click.echo(f"{'store' if store else 'cache'}: {config.store_dir or config.cache_dir}")
    for r in reports:
        rate = f"{r.computed / r.seconds:.1f} ex/s, {r.n_tokens * r.computed / max(r.n_examples, 1) / r.seconds:.0f} tok/s" \
            if r.computed else "already complete"
        where = f"{r.task}/{r.name}" if store else r.name
        click.echo(f"  {where:<16} {r.n_examples:>7} examples {r.n_tokens:>9} tokens  "
                   f"{r.disk_bytes / 2**20:8.1f} MiB  {r.disk_bytes / r.n_tokens:8.0f} B/token  "
                   f"compression {r.compression_ratio:.2f}x  {rate}")


if __name__ == "__main__":
    main()
