"""`train-side` and `predict-side`: parse, build the run configurations, train or predict.

`--online` and `predict-side` need a live backbone: they open it through cache_store.source.open_live
(the `read_side.sources` entry points, pipeline/live.py), so stage two never imports stage one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cache_store import UserError
from cache_store.commands import LOCATION, OneLineCommand, field_option
from cache_store.source import open_live
from cache_store.store import backbone_folder, task_caches

from .config import PRESETS, RunConfig
from .devices import PRECISIONS
from .read_model import POOLINGS
from .tasks import SAMPLING


def _list(value: str, kind, name: str) -> list:
    try:
        return [kind(v) for v in value.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{name} takes comma-separated values, got {value!r}") from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--from-cache", "caches", type=LOCATION, multiple=True,
              help="A cache written by cache-activations (a folder or s3://bucket/prefix); give several with "
                   "--multi-task.")
@click.option("--tasks", "task_names", default=None, metavar="TASK[,TASK...]",
              help="Of a store (cache-activations with several tasks): the tasks to train (default: all, "
                   "which needs --multi-task when there are several).")
@click.option("--multi-task", is_flag=True, help="One READ network, one head per task, over several tasks "
                                                 "(a store's, or several caches').")
@click.option("--task-sampling", type=click.Choice(SAMPLING), default="proportional", show_default=True,
              help="--multi-task: draw each batch's task in proportion to its training batches, or to "
                   "their 1/--temperature power.")
@click.option("--temperature", type=float, default=2.0, show_default=True,
              help="--task-sampling temperature: 1 is proportional; larger is closer to uniform.")
@click.option("--online", is_flag=True, help="Run the backbone live at every step instead (for comparisons).")
@click.option("--task", default=None, help="--online: the GLUE task.")
@click.option("--model", default=None, help="--online: hub id or local folder.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="--online: GLUE's tsv layout.")
@click.option("--limit", type=int, default=None, help="--online: at most N examples per split.")
@click.option("--init", default="pretrained", show_default=True, help="--online: pretrained | random.")
@field_option(RunConfig, "cell", "--rnn", grid=True)
@field_option(RunConfig, "width", "--hidden", grid=True)
@field_option(RunConfig, "lr", "--lr", grid=True)
@field_option(RunConfig, "seed", "--seeds", grid=True)
@field_option(RunConfig, "epochs", type=int)
@field_option(RunConfig, "patience", type=int)
@field_option(RunConfig, "batch_size", type=int)
@field_option(RunConfig, "pooling", type=click.Choice(("auto", *POOLINGS)))
@field_option(RunConfig, "dropout", type=float)
@field_option(RunConfig, "side_dropout", type=float)
@field_option(RunConfig, "layer_drop", type=float)
@field_option(RunConfig, "cutoff", type=float)
@field_option(RunConfig, "noise", type=float)
@field_option(RunConfig, "weight_decay", type=float)
@field_option(RunConfig, "down_norm", is_flag=True)
@field_option(RunConfig, "layer_mix", is_flag=True)
@field_option(RunConfig, "output_gate", is_flag=True)
@field_option(RunConfig, "token_mix", is_flag=True)
@field_option(RunConfig, "recurrence", "--recurrence/--no-recurrence")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="paper: the paper's READ (recurrence on, every option beside its network off); options "
                   "given on the command line still apply.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Matmul precision: auto is tf32 on a GPU and fp32 on the CPU; bf16 autocasts to bfloat16.")
@click.option("--memory-gb", type=float, default=None,
              help="Hold splits in memory up to this size, else stream the train split (default: half the RAM).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--quiet", is_flag=True)
def main(caches, task_names, multi_task, task_sampling, temperature, online, model, task, data_dir, limit, init, cell, width, lr,
         seed, preset, out, device, precision, memory_gb, resume, quiet, **choices):
    """Train READ side networks straight from cached activations (never loading the backbone), or with
    --online from the backbone run live at every step (for the equivalence and speed comparisons)."""
    from cache_store.runtime import keep_freed_memory

    from .config import MULTI_TASK_LR, grid
    from .report import write_summary
    from .train import train

    keep_freed_memory()
    if preset:  # the preset's values, except where an option was given on the command line
        given = click.get_current_context().get_parameter_source
        choices.update({k: v for k, v in PRESETS[preset].items()
                        if k not in choices or given(k) == click.core.ParameterSource.DEFAULT})
    if multi_task and click.get_current_context().get_parameter_source("lr") == click.core.ParameterSource.DEFAULT:
        lr = f"{MULTI_TASK_LR:g}"
    try:
        configs = grid(_list(cell, str, "--rnn"), _list(width, int, "--hidden"), _list(lr, float, "--lr"),
                       _list(seed, int, "--seeds"), **choices)
        if not configs:
            raise UserError("the grid is empty")
        if memory_gb is not None and memory_gb <= 0:
            raise UserError(f"--memory-gb must be positive, got {memory_gb}")
        if online == bool(caches):
            raise UserError("give either --from-cache CACHE or --online --model M --task T")
        if task_names is not None and online:
            raise UserError("--tasks picks tasks of a store; with --online give --task")
        if caches:  # each store or cache -> its tasks' caches: [(backbone folder, task, cache path)]
            wanted = [t for t in (task_names or "").split(",") if t] or None
            found = [(backbone_folder(c), task, path) for c in caches for task, path in task_caches(c, wanted)]
            if len(found) > 1 and not multi_task:
                raise UserError(f"{', '.join(str(c) for c in caches)} hold{'s' if len(caches) == 1 else ''} "
                                f"{len(found)} tasks ({', '.join(t for _, t, _ in found)}): train them as one "
                                "network with --multi-task, or one with --tasks")
            if multi_task and len(found) < 2:
                raise UserError("--multi-task needs at least two tasks (a store's, or several --from-cache caches)")
        if online:
            if not (model and task):
                raise UserError("--online needs --model and --task")
            source = open_live("online", model=model, task=task, data_dir=data_dir, limit=limit, init=init,
                               device=device)
            folder = out / f"online-{source.manifest['backbone']['name']}-{task}"
        else:
            source = [path for _, _, path in found]  # runs/<model>-<task>[+<task>...]
            folder = out / f"{found[0][0]}-{'+'.join(task for _, task, _ in found)}"
        results = train(source, configs, folder, device=device, progress=not quiet,
                        log=lambda line: click.echo(line, err=True),
                        memory_bytes=int(memory_gb * 2**30) if memory_gb else None,
                        sampling=task_sampling, temperature=temperature, resume=resume, precision=precision)
    except UserError as exc:  # the one-line refusals of both stages; anything else is a bug
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")):  # under torchrun rank 0 writes the summary of every rank's runs
        return
    files = write_summary(results, folder)
    failed = [m for m in results if m["status"] != "ok"]
    for m in failed:
        click.echo(f"{m['name']}: {m['status']}", err=True)
    scored = [m for m in results if m["best_validation"] is not None]
    if scored:
        best = max(scored, key=lambda m: m["best_validation"])
        click.echo(f"{len(results)} run(s) in {folder}; best {best['name']}: validation "
                   f"{best['best_validation']:.2f}, test {best['test']:.2f} ({best['metric']})"
                   + (f"; {len(failed)} failed (see summary.md)" if failed else ""))
    click.echo("wrote " + ", ".join(str(f.name) for f in files))


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", required=True, help="The backbone the checkpoint's cache was made from (hub id or folder).")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A run folder written by train-side (config.json, model.safetensors).")
@click.option("--input", "input_file", type=click.Path(path_type=Path, allow_dash=True), default="-",
              show_default=True, help="JSON lines (one object per input, the task's field names) or TSV with "
                                      "a header; - reads stdin.")
@click.option("--output", type=click.Path(path_type=Path, allow_dash=True), default="-", show_default=True,
              help="JSON lines, one per input; - writes stdout.")
@click.option("--batch-size", type=int, default=None,
              help="Inputs per READ batch (default: training's evaluation batch, which reproduces its outputs).")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
def predict(model, checkpoint, input_file, output, batch_size, device, quiet):
    """Run the frozen backbone once per input and every head of a trained READ checkpoint on it; write
    each head's prediction (label and probabilities, or score) as JSON lines."""
    from .predict import load_checkpoint, read_rows
    from .predict import predict as run_predict

    try:
        if batch_size is not None and batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        ready = load_checkpoint(checkpoint)
        where = "stdin" if str(input_file) == "-" else str(input_file)
        if where != "stdin" and not input_file.is_file():
            raise UserError(f"--input {input_file}: no such file")
        text = sys.stdin.read() if where == "stdin" else input_file.read_text()
        rows = read_rows(text, where)
        predictor = open_live("predictor", model=model, manifest=ready.manifest, device=device, progress=not quiet,
                              projection=ready.projection)
        records = list(run_predict(ready, predictor, rows, batch_size, progress=not quiet))
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if str(output) == "-":
        click.echo(lines, nl=False)
    else:
        partial = output.with_name(f".{output.name}.partial")
        partial.write_text(lines)  # every prediction made before anything is written, then one rename:
        partial.replace(output)    # a failure leaves no half-written output
    click.echo(f"{len(records)} input(s), {predictor.forward_passes} backbone batch(es), "
               f"{len(ready.tasks)} head(s) each" + ("" if str(output) == "-" else f"; wrote {output}"), err=True)


if __name__ == "__main__":
    main()
