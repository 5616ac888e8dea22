"""The ``normlab`` command line: a thin shell over the Python API.

Each concern registers its commands from its own module (``register(app)``); bad input anywhere ends
in one line naming the problem and exit code 2, never a traceback: click's usage errors (``--lr abc``),
:class:`~normlab.errors.NormlabError` and every other exception class a user's input or machine can cause
(files, encodings, numbers out of range, memory, devices). Under ``--json`` the error is printed as a JSON
object ``{"error": ..., "exit_code": 2}`` on stdout instead. Anything else is a normlab bug: one line with
exit code 1 (``NORMLAB_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import sys

import typer

from normlab.errors import NormlabError

app = typer.Typer(
    name="normlab",
    help="Batch Normalization, or not? Measure what BN does and train the alternatives side by side.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: wraps at the terminal's width without cutting option names, and text in brackets
    # ("[default: 0.1]", "pip install 'normlab[ray]'") is shown as written, never read as rich markup.
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from normlab import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    typer.echo(f"normlab {__version__} (torch {torch_version}, Python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print normlab's version (with torch's and Python's) and exit"),
) -> None:
    """Batch Normalization, or not? Measure what BN does and train the alternatives side by side."""


def _register_all() -> None:
    from normlab.cli import (
        catalog_cmds,
        compare_cmd,
        crossval_cmds,
        probe_cmds,
        runs_cmds,
        study_cmds,
        train_cmd,
    )

    for module in (train_cmd, runs_cmds, catalog_cmds, compare_cmd, probe_cmds, study_cmds, crossval_cmds):
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``normlab`` script."""
    click = _click()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="normlab", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `normlab runs`: the help is the answer
        typer.echo(exc.ctx.get_help())
        sys.exit(2)
    except click.exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "normlab"
        _fail(f"{exc.format_message()} (see `{command} --help`)", args)
    except typer.Exit as exc:  # with standalone_mode=False typer returns most exits; be safe
        sys.exit(getattr(exc, "exit_code", 0))
    except typer.Abort:
        _fail("aborted", args, code=130)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); finished runs are kept in the store", args, code=130)
    except click.exceptions.ClickException as exc:
        _fail(exc.format_message(), args, code=exc.exit_code)
    except Exception as exc:
        message, code = _describe(exc)
        _fail(message, args, code)
    # As click's standalone mode did: the script always ends in SystemExit (0, or a command's exit code).
    sys.exit(code if isinstance(code, int) else 0)


def _click():
    """The click typer runs on: typer >= 0.20 vendors it as ``typer._click``, older typer uses click."""
    try:
        import typer._click as click  # type: ignore[import-not-found]
    except ImportError:
        import click
    return click


def _describe(exc: Exception) -> tuple[str, int]:
    """The one-line message and exit code for an exception raised by a command."""
    import errno
    import os

    if isinstance(exc, NormlabError):
        return str(exc), 2
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        where = f": {exc.filename}" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            reason = "no space left on the device"
        elif exc.errno == errno.EROFS:
            reason = "read-only file system"
        return f"{reason}{where}", 2
    if isinstance(exc, UnicodeError):
        return f"a file or value is not valid UTF-8 text ({exc})", 2
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory ({type(exc).__name__}); use a smaller model, batch or data set", 2
    if isinstance(exc, (ValueError, OverflowError, ArithmeticError, RuntimeError, KeyError, TypeError)):
        user_caused = isinstance(exc, (ValueError, OverflowError, ArithmeticError, RuntimeError))
        text = " ".join(str(exc).split()) or type(exc).__name__
        if os.environ.get("NORMLAB_TRACEBACK"):
            raise exc
        if user_caused:
            return f"{type(exc).__name__}: {text[:300]}", 2
    if os.environ.get("NORMLAB_TRACEBACK"):
        raise exc
    text = " ".join(str(exc).split())[:300]
    return f"internal error {type(exc).__name__}: {text} (a normlab bug; NORMLAB_TRACEBACK=1 shows where)", 1


def _fail(message: str, args: list[str], code: int = 2) -> None:
    """Print ``message`` as one line (JSON on stdout under ``--json``) and exit with ``code``."""
    import json

    message = " ".join(message.split())
    options = args[: args.index("--")] if "--" in args else args
    if "--json" in options:
        typer.echo(json.dumps({"error": message, "exit_code": code}))
    else:
        typer.echo(f"error: {message}", err=True)
    sys.exit(code)
