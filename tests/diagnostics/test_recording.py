"""Tests of diagnostics.Recording: frames, summary, and the single-file format."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pandas as pd
import pytest

from diagnostics import Recording
from diagnostics.record.recording import COLUMNS, empty_frame, frame_from_rows


def _sample() -> Recording:
    steps = frame_from_rows(
        "steps",
        [
            {"step": 0, "recorded": True, "loss": 2.5, "grad_norm": 1.0, "step_time_s": 0.01},
            {"step": 1, "recorded": False, "loss": math.nan, "skipped": True, "accuracy": 0.5},
        ],
    )
    metrics = frame_from_rows(
        "metrics",
        [
            {"step": 0, "layer": "0", "factor": "K", "metric": "cond", "value": 1e300},
            {"step": 0, "layer": "0", "factor": "K", "metric": "eig_min", "value": -0.0},
            {"step": 0, "layer": "0.é", "factor": "C", "metric": "cond", "value": math.inf},
        ],
    )
    spectra = frame_from_rows(
        "spectra",
        {"step": [0, 0], "layer": ["0", "0"], "factor": ["K", "K"], "index": [0, 1],
         "value": [np.float64(0.1) + 0.2, 5e-324]},
    )  # fmt: skip
    events = frame_from_rows(
        "events",
        [
            {"step": 1, "phase": "backward", "layer": "0", "tensor": "weight.grad",
             "dtype": "float16", "shape": "(3, 5)", "numel": 15, "n_nan": 2, "n_posinf": 1,
             "n_neginf": 0, "finite_absmax": 65504.0, "grad_scale": 1024.0, "skipped": True}
        ],
    )  # fmt: skip
    memory = frame_from_rows(
        "memory",
        [
            {"step": 0, "layer": "0", "component": "K", "bytes": 2**40},
            {"step": 0, "layer": "(process)", "component": "peak_rss", "bytes": 123},
        ],
    )
    return Recording(
        name="run-α",
        steps=steps,
        metrics=metrics,
        spectra=spectra,
        events=events,
        memory=memory,
        meta={"config": {"lr": 0.1, "structures": ["dense", "diagonal"]}, "seed": 3},
        summary={"test_accuracy": 0.93, "note": None},
    )


def _assert_same(a: Recording, b: Recording) -> None:
    assert (a.name, a.meta, a.summary) == (b.name, b.meta, b.summary)
    for f in Recording.FRAMES:
        pd.testing.assert_frame_equal(getattr(a, f), getattr(b, f), check_exact=True)


def test_fresh_recording_frames_have_the_documented_columns_and_dtypes():
    r = Recording()
    for kind, cols in COLUMNS.items():
        df = getattr(r, kind)
        assert list(df.columns) == list(cols) and len(df) == 0
        for col, dtype in cols.items():
            if dtype == "str":
                assert pd.api.types.is_string_dtype(df[col].dtype)
            else:
                assert str(df[col].dtype) == dtype


def test_save_load_round_trip_is_exact(tmp_path):
    rec = _sample()
    path = rec.save(tmp_path / "run.rec")
    _assert_same(rec, Recording.load(path))
    assert Recording.load(path).spectra["value"].iloc[1] == 5e-324


def test_empty_recording_round_trip(tmp_path):
    rec = Recording(name="empty")
    _assert_same(rec, Recording.load(rec.save(tmp_path / "e.rec")))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "run.rec"
    _sample().save(path)
    good = path.read_bytes()
    bad = _sample()
    bad.meta["oops"] = object()  # not JSON data: refused before anything is written
    with pytest.raises(TypeError, match="meta"):
        bad.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.rec"]


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = _sample().save(tmp_path / "run.rec")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        (tmp_path / "cut.rec").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|damaged|not a singd-lab"):
            Recording.load(tmp_path / "cut.rec")


def test_corrupted_member_gives_a_clear_error(tmp_path):
    path = _sample().save(tmp_path / "run.rec")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("recording.json")
    pos = info.header_offset + 30 + len(info.filename) + 5
    data[pos] ^= 0xFF
    (tmp_path / "bad.rec").write_bytes(bytes(data))
    with pytest.raises(ValueError):
        Recording.load(tmp_path / "bad.rec")


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "text.rec").write_text("hello")
    with pytest.raises(ValueError, match="not a singd-lab recording"):
        Recording.load(tmp_path / "text.rec")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("data.csv", "a,b\n")
    with pytest.raises(ValueError, match="not a singd-lab recording"):
        Recording.load(tmp_path / "other.zip")
    with pytest.raises(FileNotFoundError):
        Recording.load(tmp_path / "missing.rec")


def test_newer_format_version_is_refused_by_name(tmp_path):
    with zipfile.ZipFile(tmp_path / "v9.rec", "w") as zf:
        zf.writestr("singd-lab-recording.json", '{"format": "singd-lab-recording", "version": 9}')
    with pytest.raises(ValueError, match="version 9"):
        Recording.load(tmp_path / "v9.rec")


def test_summary_row_collects_final_loss_events_memory_and_summary_numbers():
    row = _sample().summary_row()
    assert row["run"] == "run-α"
    assert row["final_loss"] == 2.5  # the NaN loss of step 1 is not a final loss
    assert row["nan_inf_events"] == 1 and row["skipped_steps"] == 1
    assert row["peak_memory_bytes"] == 123
    assert row["optimizer_state_bytes"] == 2**40
    assert row["test_accuracy"] == 0.93


def test_frame_from_rows_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kind"):
        empty_frame("frames")


def test_summary_row_reports_the_last_logged_accuracy():
    row = _sample().summary_row()
    assert row["final_accuracy"] == 0.5
