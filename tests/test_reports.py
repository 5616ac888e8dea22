"""Reports: tables, inline figures, escaping, the written files, and a headless-browser render."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from normlab.errors import NormlabError  # noqa: E402
from normlab.reports import Figure, Section, Table, format_cell, save_matplotlib, write_report  # noqa: E402

EVIL = '<script>alert("x")</script>&'
MD_EVIL = '&lt;script&gt;alert("x")&lt;/script&gt;&amp;'  # EVIL in Markdown: viewers render raw HTML


def test_format_cell_rules():
    assert format_cell(0.123456789) == "0.1235"
    assert format_cell((0.91234, 0.01234)) == "0.9123 ± 0.012"
    assert format_cell((0.5, float("nan"))) == "0.5"
    assert format_cell(None) == "—"
    assert format_cell(True) == "yes"
    assert format_cell(float("inf")) == "inf"
    assert format_cell(12) == "12"


def test_table_markdown_is_exact():
    table = Table("Acc", ["norm", "acc"], [["bn", (0.9, 0.01)], ["a|b", 0.5]], notes="n = 3 seeds")
    assert table.to_markdown() == (
        "**Acc**\n\n| norm | acc |\n|---|---|\n| bn | 0.9 ± 0.01 |\n| a\\|b | 0.5 |\n\n- n = 3 seeds"
    )


def test_table_html_escapes_every_string():
    table = Table(EVIL, [EVIL], [[EVIL]], notes=[EVIL])
    text = table.to_html()
    assert "<script>" not in text
    assert text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;") == 4


def test_table_round_trips_through_dict():
    table = Table("t", ["a", "b"], [[1, (2.0, 0.5)], ["x", None]], ["note"])
    again = Table.from_dict(table.to_dict())
    assert again == table


def test_table_row_length_checked():
    with pytest.raises(NormlabError, match=r"row 0 has 1 cells, expected 2 \(columns: a, b\)"):
        Table("t", ["a", "b"], [[1]])
    table = Table("t", ["a"])
    with pytest.raises(NormlabError, match="no column 'z'; columns: a"):
        table.column("z")


def _plot(tmp_path: Path, name: str = "curve") -> Figure:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 1])
    return save_matplotlib(fig, tmp_path, name, caption=f"caption {EVIL}")


def test_figure_is_inlined_as_the_saved_png(tmp_path):
    figure = _plot(tmp_path)
    html_text = figure.to_html(tmp_path)
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html_text).group(1)
    assert base64.b64decode(encoded) == (tmp_path / "curve.png").read_bytes()
    assert "<script>" not in html_text
    assert figure.to_markdown() == f"![caption {MD_EVIL}](curve.png)"


def test_figure_bad_inputs(tmp_path):
    with pytest.raises(NormlabError, match="figure name must be a plain file stem, got '../x'"):
        save_matplotlib(plt.figure(), tmp_path, "../x", "c")
    with pytest.raises(NormlabError, match="figure 'gone': file .*gone.png does not exist"):
        Figure("gone", "gone.png", "c").to_html(tmp_path)
    (tmp_path / "f.gif").write_bytes(b"GIF89a")
    with pytest.raises(NormlabError, match=r"unsupported format '.gif'; allowed: .png, .svg"):
        Figure("f", "f.gif", "c").to_html(tmp_path)


def test_section_rejects_unknown_callout_kind():
    with pytest.raises(NormlabError, match="callout_kind 'red' is not valid; allowed: info, ok, warn"):
        Section("s", callout="x", callout_kind="red")


def _report(tmp_path: Path):
    figure = _plot(tmp_path)
    table = Table("Accuracy", ["norm", "acc"], [["bn", (0.91, 0.02)], [EVIL, 0.5]])
    sections = [
        Section("Verdict", text=[EVIL], callout=f"BN wins {EVIL}", callout_kind="ok"),
        Section("Results", tables=[table], figures=[figure]),
        Section("Configuration", data={"lr": 0.1, "name": EVIL}),
    ]
    return write_report(tmp_path, f"Title {EVIL}", sections, subtitle="sub")


def test_write_report_files(tmp_path):
    files = _report(tmp_path)
    page = files.html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>alert" not in page  # every user string escaped
    assert page.count("data:image/png;base64,") == 1
    assert 'class="callout ok"' in page
    assert "&quot;lr&quot;: 0.1" in page
    md = files.markdown.read_text()
    assert md == files.markdown_text
    assert md.startswith(f"# Title {MD_EVIL}\n\n_sub_\n\n## Verdict\n\n> BN wins {MD_EVIL}")
    assert "<script>" not in md.split("```json")[0]
    assert "| bn | 0.91 ± 0.02 |" in md
    assert "![caption" in md and '"lr": 0.1' in md


def test_write_report_refuses_a_file_as_folder(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(NormlabError, match=f"report folder {re.escape(str(target))} exists and is a file"):
        write_report(target, "t", [])


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    files = _report(tmp_path)
    chromium = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        ]  # fmt: skip
        url = files.html.resolve().as_uri()
        dom = subprocess.run(
            [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        shot = tmp_path / "screenshot.png"
        subprocess.run(
            [*flags, f"--screenshot={shot}", "--window-size=1100,1400", url],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    # The page's script marks <body> once every <img> decoded with naturalWidth > 0.
    assert 'data-figures-loaded="1/1"' in dom
    assert "Accuracy" in dom
    assert shot.stat().st_size > 10_000
    if os.environ.get("NORMLAB_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["NORMLAB_KEEP_SCREENSHOT"])


# -- compare_report ---------------------------------------------------------------------------------


def _result(norm, batch, lr, seed, acc, status="finished", gap=0.0, speed=100.0):
    from normlab.train import RunResult

    nan = float("nan")
    return RunResult(
        status=status,
        final_test_acc=acc if status == "finished" else nan,
        train_eval_gap=gap if status == "finished" else nan,
        steps_per_s=speed,
        config={"norm": norm, "batch_size": batch, "lr": lr, "seed": seed},
    )


def _compare_results():
    runs = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        # bn: best at lr 0.1 at both batches; diverges at lr 1.0 for seed 2 at batch 128.
        runs += [_result("bn", 16, 0.1, seed, 0.80 + jitter, gap=0.03, speed=100.0),
                 _result("bn", 16, 1.0, seed, 0.70 + jitter, speed=100.0),
                 _result("bn", 128, 0.1, seed, 0.90 + jitter, gap=0.01, speed=50.0),
                 _result("bn", 128, 1.0, seed, 0.85, status="diverged" if seed == 2 else "finished")]
        # gn: flat over batch size; 2x slower steps.
        runs += [_result("gn", 16, 0.1, seed, 0.85 + jitter, speed=50.0),
                 _result("gn", 16, 1.0, seed, 0.60 + jitter, speed=50.0),
                 _result("gn", 128, 0.1, seed, 0.86 + jitter, speed=25.0),
                 _result("gn", 128, 1.0, seed, 0.50 + jitter, speed=25.0)]
    return runs


def test_compare_report_sentences_follow_the_numbers(tmp_path):
    from normlab.reports import compare_report

    files = compare_report(tmp_path, _compare_results(), title="cnn <compare>", config={"epochs": 3},
                           environment={"torch": "x"})
    md = files.markdown_text
    # batch 16: gn 85.0 vs bn 80.0, CIs (t_{.975,2} * 0.01 = 2.48 pts each) do not cover 5 pts.
    assert "At batch 16, gn wins with 85.0%, 5.0 pts ahead of bn (80.0%)." in md
    # batch 128: bn 90.0 vs gn 86.0, 4.0 pts <= 2 x 2.48 pts: a tie within the CIs.
    assert "At batch 128, bn wins with 90.0%, 4.0 pts ahead of gn (86.0%), a tie within the 95% CIs." in md
    assert "Diverged or failed runs: bn 1/12, gn 0/12. Largest stable lr at batch 128: bn 0.1, gn 1." in md
    assert ("Accuracy at batch 16 minus batch 128: bn -10.0 pts, gn -1.0 pts. Most sensitive to the batch "
            "size: bn; least: gn.") in md
    assert ("Train/eval gap at batch 16 (pts): bn +3.00, gn +0.00. Largest gap: bn at batch 16, "
            "+3.00 pts.") in md
    assert ("Training steps/s at batch 128 relative to bn: bn 1.00x, gn 0.50x; fastest: bn "
            "(50.0 steps/s).") in md
    half = round(100 * stats_t975(2) * 0.01 / 3**0.5, 2)
    assert f"| bn | 16 | 80 ± {format_cell(half, 2)} | 0.1 | 1 | 0/6 | 100 | 3 |" in md
    page = files.html.read_text()
    assert "cnn &lt;compare&gt;" in page and page.count("data:image/png;base64,") == 2


def test_compare_report_flips_with_the_data(tmp_path):
    from normlab.reports import compare_report

    flipped = []
    for r in _compare_results():
        norm = {"bn": "gn", "gn": "bn"}[r.config["norm"]]
        flipped.append(type(r)(**{**r.to_dict(), "config": {**r.config, "norm": norm}}))
    md = compare_report(tmp_path, flipped).markdown_text
    assert "At batch 16, bn wins with 85.0%, 5.0 pts ahead of gn (80.0%)." in md
    assert "Most sensitive to the batch size: gn; least: bn." in md


def test_compare_report_needs_results(tmp_path):
    from normlab.reports import compare_report

    with pytest.raises(NormlabError, match="compare_report needs at least one run result, got none"):
        compare_report(tmp_path, [])


def stats_t975(df):
    from scipy import stats

    return stats.t.ppf(0.975, df)
