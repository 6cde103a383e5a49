"""The sweep machinery on a tiny throwaway notebook (no torch, fast kernels)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from experiments.__main__ import main
from experiments.sweep import combinations, load_sweep, parse_value, run_id, run_sweep

TINY_PARAMETERS = """\
x: int = 1  # a number the notebook doubles
mode: str = "ok"  # "ok" or "bad" (bad raises)
out_dir: str = ""  # where results.json goes
"""
TINY_BODY = """\
import json, pathlib
if mode not in ("ok", "bad"):
    raise ValueError(f"parameter mode={mode!r} is not one of ['bad', 'ok']")
if mode == "bad":
    raise RuntimeError(f"deliberately bad combination x={x}")
if out_dir:
    pathlib.Path(out_dir, "rec.txt").write_text(str(x))
    runs = [{"label": "only", "doubled": 2 * x, "recording": "rec.txt"}]
    claims = {"x_is_odd": x % 2 == 1}
    pathlib.Path(out_dir, "results.json").write_text(json.dumps({"runs": runs, "claims": claims}))
"""


@pytest.fixture
def tiny_notebook(tmp_path: Path) -> Path:
    """A two-cell notebook with a tagged parameters cell, written into the test's tmp dir."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell(TINY_PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(TINY_BODY)]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("-2", -2),
        ("1e-3", 1e-3),
        ("0.5", 0.5),
        ("true", True),
        ("False", False),
        ("none", None),
        ('["singd", "kfac"]', ["singd", "kfac"]),
        ('{"a": 1}', {"a": 1}),
        ("bfloat16", "bfloat16"),
        ("hierarchical15_15", "hierarchical15_15"),
        ('"7"', "7"),
    ],
)
def test_parse_value_gives_the_natural_python_type(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_value_rejects_broken_json_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"\[1, 2"):
        parse_value("[1, 2")


def test_combinations_are_the_full_product_in_given_order() -> None:
    combos = combinations({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(combos) == 6
    assert combos[0] == {"a": 1, "b": "x"} and combos[-1] == {"a": 2, "b": "z"}


def test_combinations_reject_an_empty_value_list_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="'b'"):
        combinations({"a": [1], "b": []})


def test_run_ids_are_distinct_and_filesystem_safe() -> None:
    ids = {run_id(c) for c in combinations({"opt": [["a", "b"], ["a"]], "lr": [0.1, 1e-3]})}
    assert len(ids) == 4
    assert all(os.sep not in i and " " not in i for i in ids)


def test_sweep_continues_past_a_failed_run_and_reports_it(tiny_notebook: Path, tmp_path: Path):
    out = tmp_path / "sweep"
    summary = run_sweep(tiny_notebook, {"x": [1, 2], "mode": ["ok", "bad"]}, out, progress=False)
    assert len(summary) == 4
    ok = summary[summary["status"] == "ok"]
    bad = summary[summary["status"] == "failed"]
    assert len(ok) == 2 and len(bad) == 2
    assert bad["error"].str.contains("deliberately bad combination").all()
    assert sorted(ok["doubled"]) == [2, 4]
    assert list(ok.sort_values("x")["claims.x_is_odd"]) == [True, False]
    for _, row in summary.iterrows():
        assert Path(row["notebook"]).is_file()
    assert all(Path(p).read_text() in ("1", "2") for p in ok["recording"])
    on_disk = pd.read_csv(out / "summary.csv")
    assert len(on_disk) == 4 and set(on_disk["status"]) == {"ok", "failed"}
    report = (out / "report.html").read_text()
    assert "deliberately bad combination" in report and "doubled" in report
    again, runs = load_sweep(out)
    assert len(again) == 4 and len(runs) == 2


def test_rerunning_a_sweep_skips_done_combinations_unless_forced(tiny_notebook, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(tiny_notebook, {"x": [1, 2]}, out, progress=False)
    first = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/notebook.ipynb")}
    assert len(first) == 2
    executed = []
    summary = run_sweep(
        tiny_notebook, {"x": [1, 2, 3]}, out, progress=False, on_result=executed.append
    )
    assert [r["params"] for r in executed] == [{"x": 3}]
    assert len(summary) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    executed.clear()
    run_sweep(tiny_notebook, {"x": [1]}, out, progress=False, force=True, on_result=executed.append)
    assert [r["params"] for r in executed] == [{"x": 1}]


def test_sweep_with_two_jobs_gives_the_same_rows(tiny_notebook: Path, tmp_path: Path) -> None:
    summary = run_sweep(tiny_notebook, {"x": [5, 6]}, tmp_path / "s", jobs=2, progress=False)
    assert list(summary["x"]) == [5, 6]
    assert list(summary["doubled"]) == [10, 12]


def test_sweep_rejects_a_parameter_the_notebook_does_not_declare(tiny_notebook, tmp_path):
    with pytest.raises(ValueError, match=r"'y'.*parameters are \['mode', 'out_dir', 'x'\]"):
        run_sweep(tiny_notebook, {"y": [1]}, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_cli_sweep_parses_values_and_exits_nonzero_on_failure(tiny_notebook, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        ["sweep", str(tiny_notebook), "-p", "x", "7", "-p", "mode", "ok", "bad"]
        + ["--out", str(out)]
    )
    assert code == 1
    printed = capsys.readouterr().out
    assert "2 combinations, 1 failed" in printed and "deliberately bad" in printed
    table = pd.read_csv(out / "summary.csv")
    assert table.loc[table["status"] == "ok", "doubled"].tolist() == [14]
    assert json.loads((out / "runs" / table["run"][0] / "run.json").read_text())["params"]["x"] == 7


def test_sweep_report_is_one_offline_page_from_the_shared_writer(tmp_path: Path) -> None:
    from plotly.offline import get_plotlyjs

    from experiments.sweep import write_report

    summary = pd.DataFrame(
        [
            {"run": "a", "x": 1, "status": "ok", "error": "", "notebook": str(tmp_path / "a")},
            {"run": "b<i>", "x": 2, "status": "failed", "error": "Boom: " + "long " * 40,
             "notebook": str(tmp_path / "b")},
        ]
    )  # fmt: skip
    runs = pd.DataFrame([{"run": "a", "x": 1, "label": "only", "doubled": 2}])
    path = write_report(summary, runs, tmp_path / "report.html", title="Sweep <t>")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Sweep &lt;t&gt;</title>" in text
    assert text.count(get_plotlyjs()[:2000]) == 1 and text.count("Plotly.newPlot(") == 1
    assert "b&lt;i&gt;" in text and '<td class="text">Boom' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left
