"""What the three command lines share (cache_store is the one package both stages import): one-line usage
errors, and options built from the configuration dataclasses, so that every default and help text is
written once, beside the field it describes."""
from __future__ import annotations

from dataclasses import MISSING, field, fields

import click


def documented(default, help: str):
    """A dataclass field whose default and help text the command line reads (see `field_option`)."""
    return field(default=default, metadata={"help": help})


def field_option(config: type, name: str, *declarations: str, grid: bool = False, **options):
    """A click option for field `name` of dataclass `config`, its default and help taken from the field (a
    tuple's written as comma-separated text, as it is given). grid=True: a comma-separated list of values
    (a sweep), the default written as text."""
    found = {f.name: f for f in fields(config)}[name]
    default = found.default if found.default is not MISSING else None
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if grid:
        default, options["type"] = f"{default:g}" if isinstance(default, float) else str(default), str
    help_text = found.metadata.get("help", "") + (" Comma-separated for a sweep." if grid else "")
    options.setdefault("default", default)
    options.setdefault("show_default", options["default"] is not None and options["default"] is not False)
    return click.option(*(declarations or (f"--{name.replace('_', '-')}",)), name, help=help_text, **options)


class _Location(click.ParamType):
    """A cache's place on the command line: a folder (a Path) or s3://bucket/prefix (kept as text)."""

    name = "PATH|s3://BUCKET/PREFIX"

    def convert(self, value, param, ctx):
        from .location import as_location_arg

        return value if not isinstance(value, str) else as_location_arg(value)


LOCATION = _Location()


class _OneLineUsageError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()} (see --help)", err=True)


class OneLineCommand(click.Command):
    """A click command whose usage errors (an unknown --task, a number that is not one) print one line,
    `error: ...`, and exit 2, as every other refusal of the command lines does."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message()) from None
