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


def _render(page: Path, shot: Path) -> str:
    """The DOM of ``page`` after headless Chromium loaded it (scripts run), and its screenshot in ``shot``."""
    chromium = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        ]  # fmt: skip
        url = page.resolve().as_uri()
        dom = subprocess.run(
            [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        subprocess.run(
            [*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    return dom


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y "
                                    "chromium; .ci/run does)")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    files = _report(tmp_path)
    shot = tmp_path / "screenshot.png"
    dom = _render(files.html, shot)
    # The page's script marks <body> once every <img> decoded with naturalWidth > 0.
    assert 'data-figures-loaded="1/1"' in dom
    assert "Accuracy" in dom
    assert shot.stat().st_size > 10_000
    if os.environ.get("NORMLAB_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["NORMLAB_KEEP_SCREENSHOT"])


# -- compare_report ---------------------------------------------------------------------------------


def _result(norm, batch, lr, seed, acc, status="finished", gap=0.0, speed=100.0, convergence="converged"):
    from normlab.train import RunResult

    nan = float("nan")
    return RunResult(
        status=status,
        final_test_acc=acc if status == "finished" else nan,
        final_val_acc=acc if status == "finished" else nan,
        train_eval_gap=gap if status == "finished" else nan,
        steps_per_s=speed,
        steps=800 + 10 * seed,
        convergence=convergence if status == "finished" else status,
        run_id=1000 + len(norm) * 100 + batch + seed if lr == 0.1 else None,
        config={"norm": norm, "batch_size": batch, "lr": lr, "seed": seed},
    )


def _compare_results():
    runs = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        # bn: best at lr 0.1 at both batches (bracketed by 0.025 below and 0.4 above); at batch 128 lr 0.4
        # diverges for seed 2; at batch 16 lr 0.4 stalls at chance level.
        runs += [_result("bn", 16, 0.025, seed, 0.70 + jitter, speed=100.0),
                 _result("bn", 16, 0.1, seed, 0.80 + jitter, gap=0.03, speed=100.0),
                 _result("bn", 16, 0.4, seed, 0.10, convergence="stalled"),
                 _result("bn", 128, 0.025, seed, 0.80 + jitter, speed=50.0),
                 _result("bn", 128, 0.1, seed, 0.90 + jitter / 2, gap=0.01, speed=50.0),
                 _result("bn", 128, 0.4, seed, 0.85, status="diverged" if seed == 2 else "finished")]
        # gn: flat over batch size; 2x slower steps; its top lr is still stable at batch 128.
        runs += [_result("gn", 16, 0.025, seed, 0.75 + jitter, speed=50.0),
                 _result("gn", 16, 0.1, seed, 0.85 + jitter, speed=50.0),
                 _result("gn", 16, 0.4, seed, 0.60 + jitter, speed=50.0, convergence="stalled"),
                 _result("gn", 128, 0.025, seed, 0.80 + jitter, speed=25.0),
                 _result("gn", 128, 0.1, seed, 0.86 + jitter, speed=25.0),
                 _result("gn", 128, 0.4, seed, 0.50 + jitter, speed=25.0)]
    return runs


def _curves():
    return {r.run_id: {"train/loss": [(10, 2.0), (20, 1.0)], "val/acc": [(10, 0.5), (20, 0.8)]}
            for r in _compare_results() if r.run_id is not None}


def test_compare_report_sentences_follow_the_numbers(tmp_path):
    from normlab.reports import compare_report

    files = compare_report(tmp_path, _compare_results(), title="cnn <compare>", config={"budget": "auto"},
                           environment={"torch": "x"}, histories=_curves())
    md = files.markdown_text
    # batch 16: gn 85.0 vs bn 80.0 on the same seeds with the same jitter: paired differences 5.0 exactly.
    assert "At batch 16, gn has the highest mean test accuracy among the conclusive cells" in md
    assert ("gn beats bn on test accuracy by +5.0 pts (95% CI +5.0 to +5.0 pts, paired t over 3 seeds; "
            "margin ±1 pts).") in md
    # batch 128: bn 90.0 vs gn 86.0, per-seed differences 4.5, 4.0, 3.5: a win by the paired interval.
    assert ("bn beats gn on test accuracy by +4.0 pts (95% CI +2.8 to +5.2 pts, paired t over 3 seeds; "
            "margin ±1 pts).") in md
    assert ("Unstable runs (diverged, failed or stalled at chance level): bn 4/18, gn 3/18. Largest stable "
            "lr at batch 128: bn 0.1, gn &gt;= 0.4 (top of grid).") in md
    assert ("Most sensitive to the batch size: bn (-10.0 pts from batch 128 to 16), the largest change whose "
            "95% interval excludes 0 and is not inside the margin.") in md
    assert ("Train/eval gap at batch 16 (pts): bn +3.00, gn +0.00. Largest gap: bn at batch 16, "
            "+3.00 pts.") in md
    assert ("Training steps/s at batch 128 relative to bn: bn 1.00x, gn 0.50x; fastest: bn "
            "(50.0 steps/s).") in md
    half = round(100 * stats_t975(2) * 0.01 / 3**0.5, 2)
    ci = f"80 ± {format_cell(half, 2)}"
    assert f"| bn | 16 | {ci} | {ci} | loss | 800-820 | 3/3 | 0.1 | 0.1 | 3/9 | 100 | 3 |" in md
    assert "| gn | 128 | 86 ± 2.5 | 86 ± 2.5 | loss | 800-820 | 3/3 | 0.1 | &gt;= 0.4 | 0/9 | 25 | 0 |" in md
    assert "Rule: a difference is read against a margin of ±1 pts: equivalent when the two-sided 95%" in md
    page = files.html.read_text()
    # accuracy vs batch, accuracy vs lr, and one learning-curve figure per batch size (norms overlaid)
    assert "cnn &lt;compare&gt;" in page and page.count("data:image/png;base64,") == 2 + 2
    assert (tmp_path / "curves_bs128.png").is_file()


def test_compare_report_flips_with_the_data(tmp_path):
    from normlab.reports import compare_report

    flipped = []
    for r in _compare_results():
        norm = {"bn": "gn", "gn": "bn"}[r.config["norm"]]
        flipped.append(type(r)(**{**r.to_dict(), "config": {**r.config, "norm": norm}}))
    md = compare_report(tmp_path, flipped).markdown_text
    assert "bn beats gn on test accuracy by +5.0 pts" in md
    assert "Most sensitive to the batch size: gn (-10.0 pts from batch 128 to 16)" in md


def test_log_ticks_label_each_value_once(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.reports.ticks import set_log_ticks

    fig, ax = plt.subplots()
    ax.plot([0.0025, 0.01, 0.04, 0.16, 0.64], [1, 2, 3, 4, 5])
    set_log_ticks(ax, [0.0025, 0.01, 0.04, 0.16, 0.64])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_visible()]
    assert labels == ["0.0025", "0.01", "0.04", "0.16", "0.64"]
    assert [t.get_text() for t in ax.xaxis.get_minorticklabels()] == []
    plt.close(fig)


def test_compare_report_needs_results(tmp_path):
    from normlab.reports import compare_report

    with pytest.raises(NormlabError, match="compare_report needs at least one run result, got none"):
        compare_report(tmp_path, [])


@needs_chromium
def test_compare_report_every_figure_loads_in_headless_chromium(tmp_path):
    from normlab.reports import compare_report

    files = compare_report(tmp_path, _compare_results(), histories=_curves())
    dom = _render(files.html, tmp_path / "shot.png")
    # accuracy vs batch, accuracy vs lr and 2 learning-curve figures, each decoded by the browser
    assert 'data-figures-loaded="4/4"' in dom
    headings = re.findall(r"<h2>([^<]+)</h2>", dom)
    assert headings[:4] == ["Summary", "Figures", "Learning curves", "Verdicts"]


def stats_t975(df):
    from scipy import stats

    return stats.t.ppf(0.975, df)
