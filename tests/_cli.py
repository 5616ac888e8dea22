"""Run the real CLI in this process: ``cli(capsys, *args) -> (exit code, stdout, stderr)``."""

from __future__ import annotations

from normlab.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
