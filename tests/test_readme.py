"""The README's commands, run as a user would paste them, on a tiny BERT in place of all-MiniLM-L6-v2: every
console command in the fast tier, the `python scripts/...` lines in the integration tier."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cache_store import CacheReader
from cache_store.cli import export, import_
from cache_store.cli import main as inspect_main
from pipeline.cli import main as cache_main
from side_train.cli import main as train_main
from side_train.cli import predict

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMANDS = {"cache-activations": cache_main, "cache-inspect": inspect_main, "train-side": train_main,
            "predict-side": predict, "cache-export": export, "cache-import": import_}
# Set up by hand or by the set-up command (pip, the MODEL and GLUE variables) or run by the test runner.
NOT_RUN = ("pip ", "MODEL=", "GLUE=", "python -m pytest")
# What makes a command small enough for a test (a later option wins): caching 24 rows per split.
SMALL = {"cache-activations": ["--limit", "24", "--batch-size", "8", "--quiet"]}


def readme_commands() -> list[str]:
    """Every command of the README's indented code blocks (fenced blocks are figures), `&&` chains split,
    in order."""
    commands, fenced = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and line.strip():
            commands += [part.strip() for part in line.strip().split(" && ")]
    return commands


def _run(command: str) -> None:
    """One README command in the current folder: a console command through click, `cat FILE` as a check
    that the file is there, `echo TEXT | command` with TEXT as its input."""
    text = None
    if " | " in command:
        feed, command = command.split(" | ", 1)
        (text,) = shlex.split(feed)[1:]
    words = [os.path.expandvars(w) for w in shlex.split(command)]
    if words[0] == "cat":
        assert Path(words[1]).is_file(), command
        return
    result = CliRunner().invoke(COMMANDS[words[0]], words[1:] + SMALL.get(words[0], []), input=text)
    assert result.exit_code == 0, f"{command}\n{result.output}"


@pytest.fixture(scope="module")
def workspace(tiny_bert, glue_dir, tmp_path_factory):
    """A folder in which every console command of the README has run, in order."""
    folder = tmp_path_factory.mktemp("readme")
    saved = os.getcwd(), {k: os.environ.get(k) for k in ("MODEL", "GLUE")}
    os.chdir(folder)
    os.environ.update(MODEL=str(tiny_bert), GLUE=str(glue_dir))
    try:
        ran = []
        for command in readme_commands():
            if not command.startswith(NOT_RUN) and not command.startswith("python "):
                _run(command)
                ran.append(command.split()[0] if " | " not in command else command.split(" | ")[1].split()[0])
        yield folder, ran
    finally:
        os.chdir(saved[0])
        for k, v in saved[1].items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_every_console_command_of_the_readme_runs(workspace):
    folder, ran = workspace
    assert set(ran) == set(COMMANDS) | {"cat"}  # every command is shown at least once
    assert (folder / "runs" / "all-MiniLM-L6-v2-sst2" / "summary.md").is_file()
    assert CacheReader(folder / "caches" / "imported").manifest["task"]["name"] == "sst2"  # the HDF5 round trip


def test_the_readme_is_a_short_guide():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.integration
def test_the_readme_scripts_run(workspace):
    folder, _ = workspace
    scripts = [c for c in readme_commands() if c.startswith("python scripts/")]
    assert scripts
    for command in scripts:
        words = [os.path.expandvars(w) for w in shlex.split(command)]
        words[1] = str(REPO / words[1])
        done = subprocess.run([sys.executable, *words[1:]], cwd=folder, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert (folder / "results" / "compare" / "table.md").is_file()
