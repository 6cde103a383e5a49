"""Tests of diagnostics.views.report: one self-contained offline HTML file with a summary table."""

from __future__ import annotations

import re

import pytest
from plotly.offline import get_plotlyjs

from diagnostics import Recording
from diagnostics.record.recording import frame_from_rows
from diagnostics.views.report import report, summary_table


def _rec(name: str, final_loss: float, events: int = 0) -> Recording:
    steps = frame_from_rows(
        "steps",
        [{"step": s, "recorded": True, "loss": 3.0 - s * (3.0 - final_loss) / 3,
          "step_time_s": 0.002} for s in range(4)],
    )  # fmt: skip
    ev = [
        {"step": 1, "phase": "forward", "layer": "0", "tensor": "output", "dtype": "bfloat16",
         "shape": "(2, 2)", "numel": 4, "n_nan": 1, "n_posinf": 0, "n_neginf": 0,
         "finite_absmax": 1.0, "grad_scale": float("nan"), "skipped": False}
    ] * events  # fmt: skip
    spectra = frame_from_rows(
        "spectra",
        [{"step": s, "layer": "0", "factor": "K", "index": i, "value": 1.0 + i}
         for s in range(0, 4, 2) for i in range(3)],
    )  # fmt: skip
    memory = frame_from_rows(
        "memory",
        [{"step": 3, "layer": "0", "component": "K", "bytes": 4096},
         {"step": 3, "layer": "(process)", "component": "peak_rss", "bytes": 3 * 2**20}],
    )  # fmt: skip
    return Recording(
        name=name,
        steps=steps,
        spectra=spectra,
        events=frame_from_rows("events", ev),
        memory=memory,
        summary={"test_accuracy": 0.5 + final_loss / 10},
        meta={"optimizer": "SINGD", "seed": 0, "config": {"lr": 0.1}},
    )


def test_summary_table_has_one_row_per_run_with_the_key_numbers():
    table = summary_table([_rec("a", 0.5), _rec("b<script>", 1.0, events=2)])
    assert table["run"].tolist() == ["a", "b<script>"]
    assert table["final_loss"].tolist() == pytest.approx([0.5, 1.0])
    assert table["nan_inf_events"].tolist() == [0, 2]
    assert table["peak_memory_bytes"].tolist() == [3 * 2**20] * 2
    assert table["test_accuracy"].tolist() == pytest.approx([0.55, 0.6])
    assert table["time_per_step_s"].tolist() == pytest.approx([0.002, 0.002])


def test_report_is_one_self_contained_offline_html_file(tmp_path):
    path = report([_rec("a", 0.5), _rec("b<script>", 1.0, events=2)], tmp_path / "r.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # no external script, style or font source of any kind
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert not re.search(r"@import\s+url\(\s*[\"']?https?://", text, re.I)
    # plotly.js inlined exactly once, every figure drawn with it
    assert text.count(get_plotlyjs()[:2000]) == 1
    assert text.count("Plotly.newPlot(") == 5
    # the summary table, with the run name escaped
    assert "b&lt;script&gt;" in text and "b<script>" not in text
    assert "NaN/Inf events" in text and "3.0 MiB" in text
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_report_controls_are_plotly_dropdowns_not_kernel_widgets(tmp_path):
    text = report(_rec("a", 0.5), tmp_path / "r.html").read_text(encoding="utf-8")
    assert '"updatemenus"' in text
    assert "application/vnd.jupyter.widget" not in text


def test_report_reads_saved_recordings_from_paths(tmp_path):
    saved = _rec("from-file", 0.25).save(tmp_path / "a.rec")
    text = report({"nice name": saved}, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "nice name" in text


def test_report_refuses_things_that_are_not_recordings(tmp_path):
    with pytest.raises(TypeError, match="Recording"):
        report([object()], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_report_and_saved_recording_get_normal_file_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        html_path = report(_rec("a", 0.5), tmp_path / "r.html")
        rec_path = _rec("a", 0.5).save(tmp_path / "a.rec")
    finally:
        os.umask(old)
    assert stat.S_IMODE(html_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(rec_path.stat().st_mode) == 0o644


def test_summary_table_puts_the_useful_columns_first_and_explains_failures(tmp_path):
    failed = _rec("broken", 2.0)
    failed.summary["error"] = "KFACInverseError: " + "factor A of layer 0 is singular " * 8
    table = summary_table([_rec("a", 0.5), failed])
    assert table.columns[:8].tolist() == [
        "run", "test_accuracy", "final_loss", "nan_inf_events", "optimizer_state_bytes",
        "peak_memory_bytes", "time_per_step_s", "status",
    ]  # fmt: skip
    assert table["status"].tolist() == ["ok", "failed"]
    assert table["why"].iloc[1].startswith("KFACInverseError")
    text = report([_rec("a", 0.5), failed], tmp_path / "r.html").read_text(encoding="utf-8")
    # the long reason sits in a wrapping cell, the table in a horizontally scrolling box
    assert re.search(r'<td class="text">KFACInverseError', text)
    assert '<div class="table-wrap"><table' in text and "overflow-x: auto" in text


def test_report_figures_are_responsive_and_fill_the_page_width(tmp_path):
    text = report(_rec("a", 0.5), tmp_path / "r.html").read_text(encoding="utf-8")
    assert text.count('"responsive": true') == 5
    assert "max-width: 1200px" not in text
    divs = re.findall(r'<div class="figure">\s*<div style="height:\d+px; width:100%;">', text)
    assert len(divs) == 5


# ---------------------------------------------------------------------------- RunSummary


def test_run_status_ranks_error_over_divergence_over_stopping_early():
    from diagnostics import run_status

    assert run_status() == "ok"
    assert run_status(stopped_early=True) == "stopped early"
    assert run_status(diverged=True, stopped_early=True) == "diverged"
    assert run_status(error="KFACInverseError: x", diverged=True) == "failed"
    assert run_status(error="boom", status="custom") == "custom"


def test_run_summary_takes_numbers_from_frames_and_status_from_the_summary():
    from diagnostics import RunSummary, run_summary

    rec = _rec("d", 0.5, events=2)
    rec.summary.update(diverged=True, stopped_early=True, final_loss=99.0)
    s = run_summary(rec)
    assert isinstance(s, RunSummary)
    assert (s.run, s.steps, s.nan_inf_events) == ("d", 4, 2)
    assert s.final_loss == pytest.approx(0.5)  # the frames win over summary["final_loss"]
    assert s.status == "diverged" and s.why == ""
    assert s.peak_memory_bytes == 3 * 2**20 and s.optimizer_state_bytes == 4096
    assert s.extra["test_accuracy"] == pytest.approx(0.55)


def test_run_summary_is_what_recording_summary_row_and_summary_table_show():
    from diagnostics import run_summary

    failed = _rec("broken", 2.0)
    failed.summary["error"] = "KFACInverseError: singular"
    s = run_summary(failed)
    assert failed.summary_row() == s.row()
    assert "status" not in s.row()
    row = summary_table([failed]).iloc[0]
    assert (row["status"], row["why"]) == (s.status, s.why)
    assert s.status == "failed"
    assert s.why.startswith("KFACInverseError")


def test_run_summary_refuses_what_is_not_a_recording():
    from diagnostics import run_summary

    with pytest.raises(TypeError, match="Recording"):
        run_summary({"loss": 1.0})


# ---------------------------------------------------------------------------- layout of the table


def test_report_table_shows_the_essential_columns_and_folds_the_others(tmp_path):
    from diagnostics.views.report import ESSENTIAL_COLUMNS

    rec = _rec("a", 0.5)
    rec.summary.update({f"setting_{i}": i for i in range(16)})  # a harness's many numbers
    text = report(rec, tmp_path / "r.html").read_text(encoding="utf-8")
    main, _, folded = text.partition('<details class="more">')
    head = re.search(r"<thead>(.*?)</thead>", main, re.S).group(1)
    assert len(re.findall(r"<th", head)) == len(ESSENTIAL_COLUMNS)
    assert "setting_7" not in main and "setting_7" in folded
    assert folded.index("</details>") > folded.index("setting_15")


def test_report_shows_a_long_why_whole_in_a_wrapping_cell(tmp_path):
    rec = _rec("broken", 2.0)
    rec.summary["why"] = "the factor lost its positive definiteness " * 10 + "THE END"
    text = report(rec, tmp_path / "r.html").read_text(encoding="utf-8")
    assert re.search(r'<td class="text">the factor lost[^<]*THE END</td>', text)


def test_findings_html_highlights_the_origin_row_and_folds_rows_beyond_the_first_ten():
    import pandas as pd

    from diagnostics.diagnose import FINDING_COLUMNS, Diagnosis
    from diagnostics.views.report import findings_html

    rows = [
        {
            "step": i,
            "layer": f"l{i}",
            "factor": "A",
            "kind": "error",
            "evidence": "e",
            "message": "m",
        }
        for i in range(13)
    ]
    d = Diagnosis("l2", 2, [], pd.DataFrame(rows, columns=FINDING_COLUMNS), {"l2": "Linear 3→4"})
    out = findings_html(d)
    shown, _, folded = out.partition("<details")
    assert shown.count("<tr") == 11 and folded.count("<tr") == 4  # headers + 10 rows, + 3 rows
    assert shown.count('class="origin"') == 1 and "Linear 3→4" in shown
    origin_row = shown.split('<tr class="origin">')[1].split("</tr>")[0]
    assert "l2" in origin_row and "3 more findings" in folded


def test_report_has_a_diagnosis_per_run_and_the_eig_min_section_for_damped_factors():
    from diagnostics.record.recording import frame_from_rows
    from diagnostics.views.report import report_html

    rows = [("1", "A", "eig_min", -0.2), ("1", "A", "cond_damped", 7.0),
            ("1", "(optimizer)", "damping", 0.1)]  # fmt: skip
    metrics = [{"step": s, "layer": ly, "factor": fa, "metric": me, "value": v}
               for s in (0, 10) for ly, fa, me, v in rows]  # fmt: skip
    kfac = Recording(name="kfac-run", metrics=frame_from_rows("metrics", metrics))
    page = report_html([kfac])
    assert "<h2>Diagnosis</h2>" in page and '<h3 class="run">kfac-run</h3>' in page
    assert "Trouble started in 1 at step 0: A lost definiteness" in page
    assert "Smallest eigenvalue against −damping" in page
    assert "Smallest eigenvalue against" not in report_html([Recording(name="plain")])
