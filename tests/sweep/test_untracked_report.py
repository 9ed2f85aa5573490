"""Every multirun leaves its report: ``python train.py -m experiment=smoke mapper.num_layers=0,1`` (smoke turns
tracking off) once left two metrics.json and no report, and ``clipqa-report --sweep-dir`` on it failed for want of
.clipqa_mlflow_parent.json. Hand-made folders: tests/report/test_folders.py."""

import subprocess

import pytest

from tests.helpers.runs import SMALL_DEMO, run_cli
from tests.report.test_comparison import main_table
from tests.sweep.test_multirun import report_command

pytestmark = pytest.mark.slow


def test_an_untracked_multirun_leaves_its_report_and_clipqa_report_writes_the_same(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("-m", *SMALL_DEMO, "mapper.num_layers=0,1", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = sweep / "report" / "report.md"
    assert f"sweep report: {report}" in r.stdout + r.stderr  # it says where
    md = report.read_text()
    assert md.startswith(f"# clipqa sweep `experiment=smoke mapper.num_layers=0,1` in `{sweep}`\n")
    rows = main_table(md)
    assert [row[0] for row in rows] == ["`mapper.num_layers=0`", "`mapper.num_layers=1`"]
    assert rows[0][6] == "baseline" and "McNemar (b=" in rows[1][9] and "200 q)" in rows[1][9]
    assert {p.name for p in (sweep / "report").iterdir()} >= {
        "report.md", "report.csv", "report.tex", "comparison.png", "learning_curves.png",
    }  # fmt: skip
    assert not (sweep / ".clipqa_mlflow_parent.json").exists()  # untracked: no MLflow parent run

    out = tmp_path / "again"
    rep = subprocess.run(
        [report_command(), "--sweep-dir", str(sweep), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (out / "report.md").read_text() == md
    assert (out / "report.tex").read_text() == (sweep / "report" / "report.tex").read_text()
