"""Run the real CLI in this process: ``cli(capsys, *args) -> (exit code, stdout, stderr)``."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from normlab.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The same without pytest's capsys: stdout and stderr captured by redirection."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()
