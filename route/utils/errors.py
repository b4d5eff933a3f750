"""Command-line plumbing shared by every entry point: user errors as one line, and help that reads.

    @cli("route evaluate")
    def main(argv: list[str] | None = None) -> None:
        parser = ArgumentParser(description="...")      # argparse with one-line errors, defaults and --debug
        ...

A user error (a bad value, an unknown choice, a missing file or directory, a model path that is not there) ends the
command with ONE line on stderr, `PROG: error: MESSAGE`, and exit status 2. The project raises `ValueError` naming the
field or flag and the allowed values for bad input, so `cli` treats as the user's a `ValueError` that a `raise`
statement raised and an `OSError` (files, the Hub), except inside torch or numpy (a shape or dtype mismatch there is a
bug); a ValueError of the runtime (`a, b = three_items`) and every other exception is a bug and keeps its
traceback (`is_user_error`). `--debug` (stripped from the command line before the parser sees it) or
`ROUTE_DEBUG=1` lets the traceback of a user error through as well. In the main job, whose inherited `--debug VALUE`
is the trainer's own option, only a bare `--debug` (not followed by one of `TRAINER_DEBUG_OPTIONS`) is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import linecache
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

DEBUG_ENV = "ROUTE_DEBUG"
DEBUG_HELP = f"show the traceback of an error (also {DEBUG_ENV}=1)"
TRAINER_DEBUG_OPTIONS = ("underflow_overflow", "tpu_metrics_debug")  # values of TrainingArguments.debug
_INTERNAL_MODULES = ("torch", "numpy")  # a ValueError raised inside these is a bug, not the user's input

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(ValueError):
    """A user error found by the command line itself (argparse's errors: unknown flag, bad choice, missing value)."""


def pop_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether a traceback was asked for, argv without the bare `--debug` flags)."""
    out, debug = [], os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--debug" and following not in TRAINER_DEBUG_OPTIONS:
            debug = True
        else:
            out.append(arg)
    return debug, out


def is_user_error(e: BaseException) -> bool:
    """A `UsageError`; an OSError (files, the Hub); or a ValueError that a `raise` statement raised (the project's
    checks, and the libraries' config checks), outside torch and numpy. A ValueError the runtime raises in code
    (`a, b = three_items`, `int("x")`) or a check inside torch or numpy (a shape or dtype mismatch) is a bug."""
    if isinstance(e, UsageError):
        return True
    if not isinstance(e, (ValueError, OSError)):
        return False
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None or last.tb_frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL_MODULES:
        return False
    if isinstance(e, OSError):
        return True
    line = linecache.getline(last.tb_frame.f_code.co_filename, last.tb_lineno).lstrip()
    return line.startswith("raise ")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (whitespace runs collapsed); its type when it has no message."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # `[Errno 2] ...: 'x'` reads worse
        text = f"{e.strerror}: {e.filename}"
    return text or type(e).__name__


def cli(prog: str) -> Callable[[F], F]:
    """Decorate a command line's `main(argv)`: user errors become one line on stderr and exit status 2 (see the
    module docstring); `--debug` / ROUTE_DEBUG=1 keeps the traceback. `main` receives argv without `--debug`."""

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> Any:
            debug, args = pop_debug(list(sys.argv[1:] if argv is None else argv))
            try:
                return main(args)
            except (ValueError, OSError) as e:
                if debug or not is_user_error(e):
                    raise
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                raise SystemExit(2) from None

        return run  # type: ignore[return-value]

    return wrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, once: not when the help already states it, nor for a required option
    (whose default means nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "default:" in text.lower() or action.required or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class RawHelpFormatter(argparse.RawTextHelpFormatter, HelpFormatter):
    """`HelpFormatter` that keeps the description's and the options' line breaks."""


class OneLineErrors:
    """Mixin for an argparse parser: `error()` raises `UsageError` (printed by `cli` as one line) instead of printing
    the usage and exiting; `--help` is untouched."""

    def error(self, message: str) -> None:  # argparse's hook
        raise UsageError(message)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """argparse with one-line errors, every option's default in its help, and `--debug` listed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)  # taken out by `cli` (pop_debug)


def with_one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` (built elsewhere, e.g. by TRL) with `OneLineErrors` (its class swapped for a subclass) and `--debug`
    listed in its help."""
    parser.__class__ = type(type(parser).__name__, (OneLineErrors, type(parser)), {})
    existing = parser._option_string_actions.get("--debug")
    if existing is None:
        parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    else:  # the trainer's own --debug VALUE: a bare --debug is ours (pop_debug)
        existing.help = f"{existing.help} A bare --debug (no value): {DEBUG_HELP}."
    return parser


def dataclass_parser(base: type, dataclass_types: Any, **kwargs: Any) -> Any:
    """An `HfArgumentParser` (or subclass, e.g. TRL's `TrlParser`) over `dataclass_types`, with one-line errors,
    defaults stated once, negated booleans (`--no_x`) described in their own words, and `--debug` listed."""
    parser = with_one_line_errors(base(dataclass_types, formatter_class=HelpFormatter, **kwargs))
    describe_negated(parser)
    return parser


def parse_dataclasses(parser: Any, argv: list[str]) -> tuple:
    """`parser.parse_args_into_dataclasses(argv)` (an HfArgumentParser) with unknown arguments as a UsageError that
    names them (instead of the parser's own message)."""
    *outputs, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    return tuple(outputs)


def describe_negated(parser: argparse.ArgumentParser) -> None:
    """`--no_x` (a boolean field that defaults to true) gets its own help instead of repeating `--x`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no"):
            action.help = f"Set {action.dest} to false (default: {action.dest} is true; see --{action.dest})."


def looks_local(path: str) -> bool:
    """Whether a model argument names a local path rather than a Hub id (`org/name`): it exists, starts with `.`, `/`
    or `~`, has more than one `/`, or its parent directory exists here (`runs/nope` when `runs/` does)."""
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    return "/" in path and Path(path).parent.is_dir()


def check_paths(flag: str, paths: Any, kind: str = "file or directory") -> None:
    """Every path in `paths` (one or a list) exists (kind `file`, `directory`, or `file or directory`); a UsageError
    naming `flag` otherwise."""
    test = {"file": os.path.isfile, "directory": os.path.isdir}.get(kind, os.path.exists)
    missing = [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths) if not test(p)]
    if missing:
        raise UsageError(f"{flag}: no such {kind}: {', '.join(missing)}")


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
    """Checks or loading of one flag's value: a ValueError or OSError inside becomes a UsageError whose message starts
    with `flag`."""
    try:
        yield
    except (ValueError, OSError) as e:
        if str(e).startswith(flag) or not is_user_error(e):
            raise
        raise UsageError(f"{flag}: {one_line(e)}") from e


def at_least(flag: str, value: Any, low: float = 1) -> None:
    """`value` (one number, a list, or None: skipped) is at least `low`; a UsageError naming `flag` otherwise."""
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v is not None and v < low]
    if bad:
        raise UsageError(f"{flag}: must be >= {low:g}, got {bad[0] if len(values) == 1 else bad}")


__all__ = [
    "ArgumentParser",
    "DEBUG_ENV",
    "HelpFormatter",
    "OneLineErrors",
    "RawHelpFormatter",
    "UsageError",
    "at_least",
    "check_paths",
    "cli",
    "dataclass_parser",
    "describe_negated",
    "is_user_error",
    "looks_local",
    "naming",
    "one_line",
    "parse_dataclasses",
    "pop_debug",
    "with_one_line_errors",
]
