"""A sweep's training state between epochs, for `--resume`: every run's weights, optimiser moments and
early-stopping record after the last finished epoch, in one file beside the run folders."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cache_store import UserError, faults

from .stacks import Run, Stack

STATE_FILE = "training_state.pt"  # in the sweep's folder while it trains; removed when it finishes


def state_file(world) -> str:
    """Under torchrun each rank keeps the state of its own runs."""
    return STATE_FILE if not world.distributed else f"training_state.rank{world.rank}-of-{world.size}.pt"


def save_state(out: Path, epoch: int, stacks: list[Stack], name: str = STATE_FILE) -> None:
    """Every run's state after `epoch`, in one file replaced atomically: a crash leaves the previous
    epoch's whole state or this one's, never a mix of runs at different epochs."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (name + ".partial")
    torch.save({"epoch": epoch,
                "stacks": {tuple(r.config.name for r in s.runs): s.state() for s in stacks},
                "runs": {r.config.name: {k: getattr(r, k) for k in Run.KEPT} for s in stacks for r in s.runs}},
               partial)
    os.replace(partial, out / name)
    faults.after_epoch_saved(epoch + 1)


def load_state(out: Path, stacks: list[Stack], resume: bool, name: str = STATE_FILE) -> int:
    """The first epoch to train: 0, or the one after the saved state's when resuming."""
    path = out / name
    if not path.is_file():
        return 0
    if not resume:
        raise UserError(f"{out} holds an unfinished training run ({name}); continue it with --resume, "
                        "or choose another --out")
    saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings: nothing to run
    names = sorted(r.config.name for s in stacks for r in s.runs)
    if sorted(saved["runs"]) != names:
        raise UserError(f"{out} was training runs {', '.join(sorted(saved['runs']))}, not {', '.join(names)}; "
                        "resume with the options it was started with, or choose another --out")
    for stack in stacks:
        stack.restore(saved["stacks"][tuple(r.config.name for r in stack.runs)])
        for run in stack.runs:
            for key, value in saved["runs"][run.config.name].items():
                setattr(run, key, value)
        stack.begin_epoch()  # which members still train, from the restored runs
    return saved["epoch"] + 1
