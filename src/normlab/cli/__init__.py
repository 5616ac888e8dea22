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
import warnings

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

INTERRUPTED = "interrupted (Ctrl-C); finished runs are kept in the store"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``normlab`` script."""
    click = _click()
    args = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings(record=True) as caught:
        code = _run(click, args)
    # Only a command that succeeded shows its warnings: on an error path the one-line message is all.
    for warning in caught:
        text = " ".join(str(warning.message).split())
        typer.echo(f"warning: {warning.category.__name__}: {text}", err=True)
    # As click's standalone mode did: the script always ends in SystemExit (0, or a command's exit code).
    sys.exit(code if isinstance(code, int) else 0)


def _run(click, args: list[str]):
    """The command's return value; every error ends here in :func:`_fail` (one line, its exit code)."""
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
        _fail(INTERRUPTED, args, code=130)
    except click.exceptions.ClickException as exc:
        _fail(exc.format_message(), args, code=exc.exit_code)
    except Exception as exc:
        message, code = _describe(exc)
        _fail(message, args, code)
    if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent Exit(130); no command returns 130
        _fail(INTERRUPTED, args, code=130)
    return code


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
    where = _user_frame(exc)
    if where is not None and not os.environ.get("NORMLAB_TRACEBACK"):
        # The user's model (--model file.py:f) raised it, not normlab: a mistake in their code (issue 29).
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return f"your code {where} raised {type(exc).__name__}: {text}", 2
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


def _user_frame(exc: BaseException) -> str | None:
    """``file.py:LINE (in FUNC)`` of the innermost traceback frame of ``exc`` in code that is neither
    normlab's, the standard library's nor an installed package's (a user's model file), or None."""
    import os
    import site
    import sysconfig
    from pathlib import Path

    import normlab

    ours = [str(Path(normlab.__file__).parent), site.getusersitepackages(), *site.getsitepackages()]
    ours += {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if not file.startswith("<") and not any(file.startswith(root + os.sep) for root in ours):
            found = f"{Path(file).name}:{tb.tb_lineno} (in {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return found


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
