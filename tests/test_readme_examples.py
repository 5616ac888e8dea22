"""README's examples exist and run: every command of a README ``bash`` block that names a file under
``examples/`` is run as written, in a folder where ``examples/`` is the repository's, with its budget cut
to a few steps so the test stays fast:

- ``--epochs N`` -> ``--steps 2``; compare also gets ``--seeds 1 --batch-sizes 16 --lr-extensions 0``;
- study gets ``--scale tiny --seeds 1 --set subset=128`` (the slow tier: a tiny study is still tens of
  CPU seconds); train ``--eval-train-samples 64``;
- every normlab command on ``examples/my_models.py:resnet`` without ``--model-options`` gets
  ``--model-options '{"width": 4, "depth": 10}'`` (ResNet-10 at width 4), probes ``--batch-size 16``.

A command that names a missing example file, an option that does not exist or a failing run fails here.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RESNET = '{"width": 4, "depth": 10}'


def readme_commands() -> list[str]:
    """The commands (continuation lines joined, comments dropped) of README bash blocks naming examples/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if "examples/" not in block:
            continue
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _tiny(args: list[str]) -> list[str]:
    args = list(args)
    if "--epochs" in args:
        i = args.index("--epochs")
        args[i:i + 2] = ["--steps", "2"]
    command = args[0]
    if command == "compare":
        args += ["--seeds", "1", "--batch-sizes", "16", "--lr-extensions", "0", "--no-report"]
    if command == "study":
        args += ["--scale", "tiny", "--seeds", "1", "--set", "subset=128"]
    if command == "probe":
        args += ["--batch-size", "16"]
    if "examples/my_models.py:resnet" in args and "--model-options" not in args:
        args += ["--model-options", TINY_RESNET]
    return args


def test_readme_names_example_files_that_exist():
    commands = readme_commands()
    assert len(commands) >= 7
    named = {m for c in commands for m in re.findall(r"(examples/[\w./-]+\.py):\w+", c)}
    assert named == {"examples/my_models.py", "examples/my_1d_models.py"}
    assert all((ROOT / path).is_file() for path in named)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """A folder with ``examples/`` and the data the README's python line writes (run as written)."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(ROOT / "examples")
    for command in readme_commands():
        args = shlex.split(command, comments=True)
        if args[0] == "python":
            assert args[1] == "-c", command
            subprocess.run([sys.executable, "-c", args[2]], check=True, cwd=folder, timeout=60)
    assert (folder / "data.npz").is_file()
    return folder


def _normlab_commands(slow: bool) -> list:
    commands = [c for c in readme_commands() if c.startswith("normlab ")]
    # A study trains a grid and measures each run's train/eval gap: tens of CPU seconds even when tiny.
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(c, marks=marks) for c in commands if c.startswith("normlab study") == slow]


def _run_readme(command: str, folder: Path, monkeypatch, capsys) -> list[str]:
    monkeypatch.chdir(folder)
    monkeypatch.setenv("NORMLAB_STORE", str(folder / "runs.sqlite"))
    argv = _tiny(shlex.split(command, comments=True)[1:])
    if argv[0] == "study":
        argv += ["--out", str(folder / "results")]
    if argv[0] == "train":
        argv += ["--eval-train-samples", "64"]
    try:
        main(argv)
    except SystemExit as exc:
        captured = capsys.readouterr()
        assert exc.code in (0, None), f"{shlex.join(argv)}: {captured.err[-500:]}"
    return argv


@pytest.mark.parametrize("command", _normlab_commands(slow=False))
def test_readme_example_command_runs(command, readme_folder, monkeypatch, capsys):
    _run_readme(command, readme_folder, monkeypatch, capsys)


@pytest.mark.parametrize("command", _normlab_commands(slow=True))
def test_readme_example_study_runs_and_names_the_users_model(command, readme_folder, monkeypatch, capsys):
    argv = _run_readme(command, readme_folder, monkeypatch, capsys)
    subtitle = (readme_folder / "results" / "large-batch" / "report.md").read_text().splitlines()[2]
    model = argv[argv.index("--model") + 1]
    assert f"--model {model}" in subtitle


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("normlab ")])
def test_every_readme_example_option_exists(command, capsys):
    """``--help`` of each example's command lists every option the example uses."""
    args = shlex.split(command, comments=True)[1:]
    words = [a for a in args if not a.startswith("-")]
    path = words[:2] if words[0] in ("crossval",) else words[:1]
    with contextlib.suppress(SystemExit):
        main([*path, "--help"])
    help_text = capsys.readouterr().out
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert option in help_text, (command, option)
