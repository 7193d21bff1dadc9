"""`train-side`: parse, build the run configurations, train. Nothing else lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cache_store import CacheError
from cache_store.runtime import OneLineCommand

from .read_model import CELLS
from .tasks import SAMPLING


def _live_source(name: str, **options):
    """A live backbone, found through the `read_side.sources` entry points (pipeline/live.py), so that
    stage two never imports stage one."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="read_side.sources", name=name))
    if not found:
        raise ValueError(f"the live backbone source {name!r} of this package is not installed; "
                         "reinstall it (pip install -e .)")
    return found[0].load()(**options)


def _is_user_error(exc: Exception) -> bool:
    # pipeline's InputError is matched by name: importing it here would import stage one.
    return isinstance(exc, (ValueError, CacheError)) or type(exc).__name__ == "InputError"


def _list(value: str, kind, name: str) -> list:
    try:
        return [kind(v) for v in value.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{name} takes comma-separated values, got {value!r}") from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--from-cache", "caches", type=click.Path(path_type=Path), multiple=True,
              help="A cache written by cache-activations; give several with --multi-task.")
@click.option("--multi-task", is_flag=True, help="One READ network, one head per task, over several caches.")
@click.option("--task-sampling", type=click.Choice(SAMPLING), default="proportional", show_default=True,
              help="--multi-task: draw each batch's task in proportion to its training batches, or to "
                   "their 1/--temperature power.")
@click.option("--temperature", type=float, default=2.0, show_default=True,
              help="--task-sampling temperature: 1 is proportional; larger is closer to uniform.")
@click.option("--online", is_flag=True, help="Run the backbone live at every step instead (for comparisons).")
@click.option("--model", default=None, help="--online: hub id or local folder.")
@click.option("--task", default=None, help="--online: the GLUE task.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="--online: GLUE's tsv layout.")
@click.option("--limit", type=int, default=None, help="--online: at most N examples per split.")
@click.option("--init", default="pretrained", show_default=True, help="--online: pretrained | random.")
@click.option("--rnn", default="gru", show_default=True, help=f"Cells, comma-separated: {', '.join(CELLS)}.")
@click.option("--hidden", default="144", show_default=True,
              help="Side widths r, comma-separated; each a multiple of the backbone's attention heads.")
@click.option("--lr", default="3e-4", show_default=True, help="Learning rates, comma-separated.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--patience", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--pooling", type=click.Choice(["mean", "first"]), default="mean", show_default=True,
              help="Encoder-only backbones: the heads read the mean of the corrected tokens, or the first ([CLS]).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the features the heads read.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW's decoupled weight decay.")
@click.option("--no-recurrence", is_flag=True, help="One set of parameters per layer (the paper's ablation).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--memory-gb", type=float, default=None,
              help="Hold splits in memory up to this size, else stream the train split (default: half the RAM).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--quiet", is_flag=True)
def main(caches, multi_task, task_sampling, temperature, online, model, task, data_dir, limit, init, rnn, hidden, lr,
         seeds, epochs, patience, batch_size, pooling, dropout, weight_decay, no_recurrence, out, device, memory_gb, resume, quiet):
    """Train READ side networks straight from cached activations (never loading the backbone), or with
    --online from the backbone run live at every step (for the equivalence and speed comparisons)."""
    from cache_store.runtime import keep_freed_memory

    from .config import grid
    from .report import write_summary
    from .train import train

    keep_freed_memory()
    try:
        configs = grid(_list(rnn, str, "--rnn"), _list(hidden, int, "--hidden"), _list(lr, float, "--lr"),
                       _list(seeds, int, "--seeds"), recurrence=not no_recurrence, epochs=epochs,
                       patience=patience, batch_size=batch_size, pooling=pooling, dropout=dropout,
                       weight_decay=weight_decay)
        if not configs:
            raise ValueError("the grid is empty")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError(f"--memory-gb must be positive, got {memory_gb}")
        if online == bool(caches):
            raise ValueError("give either --from-cache CACHE or --online --model M --task T")
        if len(caches) > 1 and not multi_task:
            raise ValueError("several --from-cache caches train one network only with --multi-task")
        if multi_task and len(caches) < 2:
            raise ValueError("--multi-task needs at least two --from-cache caches (one per task)")
        if online:
            if not (model and task):
                raise ValueError("--online needs --model and --task")
            source = _live_source("online", model=model, task=task, data_dir=data_dir, limit=limit, init=init,
                                    device=device)
            folder = out / f"online-{source.manifest['backbone']['name']}-{task}"
        else:
            source = list(caches)  # caches/<model>/<task>: runs/<model>-<task>[+<task>...]
            folder = out / f"{caches[0].parent.name}-{'+'.join(c.name for c in caches)}"
        results = train(source, configs, folder, device=device, progress=not quiet,
                        log=lambda line: click.echo(line, err=True),
                        memory_bytes=int(memory_gb * 2**30) if memory_gb else None,
                        sampling=task_sampling, temperature=temperature, resume=resume)
    except Exception as exc:  # the one-line errors of both stages; anything else is a bug: re-raise
        if not _is_user_error(exc):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
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
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        ready = load_checkpoint(checkpoint)
        where = "stdin" if str(input_file) == "-" else str(input_file)
        if where != "stdin" and not input_file.is_file():
            raise ValueError(f"--input {input_file}: no such file")
        text = sys.stdin.read() if where == "stdin" else input_file.read_text()
        rows = read_rows(text, where)
        predictor = _live_source("predictor", model=model, manifest=ready.manifest, device=device,
                                 progress=not quiet)
        records = list(run_predict(ready, predictor, rows, batch_size, progress=not quiet))
    except Exception as exc:
        if not _is_user_error(exc):
            raise
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
