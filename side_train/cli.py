"""`train-side`: parse, build the run configurations, train. Nothing else lives here."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from cache_store import CacheError

from .read_model import CELLS


def _online_source(**options):
    """The live backbone, found through the `read_side.sources` entry point (pipeline/live.py), so that
    stage two never imports stage one."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="read_side.sources", name="online"))
    if not found:
        raise ValueError("--online needs the live backbone source of this package; reinstall it (pip install -e .)")
    return found[0].load()(**options)


def _is_user_error(exc: Exception) -> bool:
    # pipeline's InputError is matched by name: importing it here would import stage one.
    return isinstance(exc, (ValueError, CacheError)) or type(exc).__name__ == "InputError"


def _list(value: str, kind, name: str) -> list:
    try:
        return [kind(v) for v in value.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{name} takes comma-separated values, got {value!r}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--from-cache", "cache", type=click.Path(path_type=Path), default=None,
              help="A cache written by cache-activations.")
@click.option("--online", is_flag=True, help="Run the backbone live at every step instead (for comparisons).")
@click.option("--model", default=None, help="--online: hub id or local folder.")
@click.option("--task", default=None, help="--online: the GLUE task.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="--online: GLUE's tsv layout.")
@click.option("--limit", type=int, default=None, help="--online: at most N examples per split.")
@click.option("--init", default="pretrained", show_default=True, help="--online: pretrained | random.")
@click.option("--rnn", default="gru", show_default=True, help=f"Cells, comma-separated: {', '.join(CELLS)}.")
@click.option("--hidden", default="128", show_default=True, help="Side widths r, comma-separated.")
@click.option("--lr", default="3e-4", show_default=True, help="Learning rates, comma-separated.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--patience", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--no-recurrence", is_flag=True, help="One set of parameters per layer (the paper's ablation).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--memory-gb", type=float, default=None,
              help="Hold splits in memory up to this size, else stream the train split (default: half the RAM).")
@click.option("--quiet", is_flag=True)
def main(cache, online, model, task, data_dir, limit, init, rnn, hidden, lr, seeds, epochs, patience, batch_size,
         no_recurrence, out, device, memory_gb, quiet):
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
                       patience=patience, batch_size=batch_size)
        if not configs:
            raise ValueError("the grid is empty")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError(f"--memory-gb must be positive, got {memory_gb}")
        if online == (cache is not None):
            raise ValueError("give either --from-cache CACHE or --online --model M --task T")
        if online:
            if not (model and task):
                raise ValueError("--online needs --model and --task")
            source = _online_source(model=model, task=task, data_dir=data_dir, limit=limit, init=init,
                                    device=device)
            folder = out / f"online-{source.manifest['backbone']['name']}-{task}"
        else:
            source, folder = cache, out / f"{cache.parent.name}-{cache.name}"
        results = train(source, configs, folder, device=device, progress=not quiet,
                        log=lambda line: click.echo(line, err=True),
                        memory_bytes=int(memory_gb * 2**30) if memory_gb else None)
    except Exception as exc:  # the one-line errors of both stages; anything else is a bug: re-raise
        if not _is_user_error(exc):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    files = write_summary(results, folder)
    best = max(results, key=lambda m: m["best_validation"])
    click.echo(f"{len(results)} run(s) in {folder}; best {best['name']}: validation {best['best_validation']:.2f}, "
               f"test {best['test']:.2f} ({best['metric']})")
    click.echo("wrote " + ", ".join(str(f.name) for f in files))


if __name__ == "__main__":
    main()
