"""Every multirun leaves its report: a sweep run with tracking off (``experiment=smoke``) gets the report of its job
folders (metrics.json, test_predictions.tsv, .hydra/overrides.yaml) from the end-of-sweep callback and from
``clipqa-report --sweep-dir``, with the same rows and paired statistics as the MLflow report of the same runs.
Hand-made job folders in the layout ``python train.py -m`` writes (tests/sweep/test_untracked_report.py runs one)."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from clipqa import cli
from clipqa.errors import ClipqaError
from clipqa.report.comparison import make_folder_report, make_report
from clipqa.sweep.mlflow_parent import MlflowSweepCallback
from tests.helpers.runs import mlflow_store
from tests.report.test_comparison import TYPES, fake_run, main_table

N = 40
# Per-question correctness of three jobs (the baseline job 0 gets questions 0..19 right).
BASE = [i < 20 for i in range(N)]
BETTER = [i < 18 or 20 <= i < 36 for i in range(N)]  # vs job 0: b=2, c=16
SAME = [1 <= i < 21 for i in range(N)]  # b=1, c=1


def write_job(sweep: Path, num: int, overrides: list[str], correct: list[bool] | None, layers: int) -> Path:
    """A job folder as Hydra and clipqa's run function leave it; ``correct=None``: a job that failed (no
    metrics.json, no predictions)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num, "name": "train"}}}))
    config = {"mapper": {"num_layers": layers}, "trainer": {"seed": 1, "epochs": 1}, "tracking": {"run_name": None}}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    if correct is None:
        return job
    acc = sum(correct) / len(correct)
    metrics = {"test/acc": acc, "val/acc": acc, "test/prior_acc": 0.1, "data/n_test": N, "data/n_test_evaluated": N}
    metrics |= {f"test/acc/{t}": acc for t in TYPES} | {"params/trainable": 1e6, "test/acc/none": None}
    (job / "metrics.json").write_text(json.dumps(metrics))
    rows = ["image_id\ttype\tquestion\tanswer\tprediction\tcorrect"]
    rows += [
        f"{100 + i}\tobject\tquestion {i}\tcat\t{'cat' if ok else 'dog'}\t{int(ok)}" for i, ok in enumerate(correct)
    ]
    (job / "test_predictions.tsv").write_text("\n".join(rows) + "\n")
    history = [{"step": 1, "train/loss": 2.0}, {"step": 2, "val/acc": acc, "train/loss": 1.0}]
    (job / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return job


def untracked_sweep(tmp_path: Path) -> Path:
    """``python train.py -m experiment=smoke mapper.num_layers=0,1,2,3`` with tracking off; job 3 failed."""
    sweep = tmp_path / "multirun" / "12-00-00"
    for num, correct in enumerate([BASE, BETTER, SAME, None]):
        write_job(sweep, num, ["experiment=smoke", f"mapper.num_layers={num}"], correct, num)
    task = ["experiment=smoke", "mapper.num_layers=0,1,2,3", f"hydra.sweep.dir={sweep}"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    return sweep


def test_an_untracked_sweep_is_reported_from_its_job_folders_with_the_paired_statistics(tmp_path):
    sweep = untracked_sweep(tmp_path)
    md = make_folder_report(sweep, tmp_path / "rep").read_text()
    rows = {r[0]: r for r in main_table(md)}
    assert list(rows) == [f"`mapper.num_layers={n}`" for n in range(3)]
    assert rows["`mapper.num_layers=0`"][2:5] == ["50.0", "35.2–64.8", "baseline"]
    # job 1 vs job 0: b=2, c=16 over 40 questions: Δ +35.0, raw p = 2 (1 + 18 + 153) / 2^18; Holm over 2 rows x 2
    assert (
        rows["`mapper.num_layers=1`"][4] == "+35.0" and "McNemar (b=2, c=16, 40 q)" in rows["`mapper.num_layers=1`"][7]
    )
    assert rows["`mapper.num_layers=1`"][6].endswith("**\\***")
    assert "(b=1, c=1, 40 q)" in rows["`mapper.num_layers=2`"][7] and rows["`mapper.num_layers=2`"][6] == "1"
    assert "mapper.num_layers=3 (job 3: no metrics.json)" in md  # the failed job is named, not dropped silently
    title, detail = md.splitlines()[:2]
    assert title == f"# clipqa sweep `experiment=smoke mapper.num_layers=0,1,2,3` in `{sweep}`"
    assert "Command: `python train.py -m experiment=smoke mapper.num_layers=0,1,2,3`" in detail
    assert "Tracking was off" in detail and "hydra.sweep.dir" not in detail
    table = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert [(r["variant"], r["runs"], r["b"], r["c"]) for r in table][1] == ("mapper.num_layers=1", "1", "2", "16")
    for f in ("report.tex", "comparison.png", "learning_curves.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 500
    with pytest.raises(ClipqaError, match="--baseline 7 is not one of the finished runs"):
        make_folder_report(sweep, tmp_path / "b", baseline_run_id="7")


def test_clipqa_report_baseline_names_a_job_folder(tmp_path, capsys):
    sweep = untracked_sweep(tmp_path)
    cli.report(["--sweep-dir", str(sweep), "--out", str(tmp_path / "b"), "--baseline", "1"])
    rows = main_table((tmp_path / "b" / "report.md").read_text())
    assert rows[1][4] == "baseline" and rows[0][4] == "-35.0"


@pytest.mark.slow  # ~4-10 s: an MLflow store, runs with artifacts and two reports
def test_the_folder_report_has_the_rows_and_statistics_of_the_mlflow_report_of_the_same_runs(tmp_path):
    sweep = untracked_sweep(tmp_path)
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for num, correct in enumerate([BASE, BETTER, SAME]):
        tags = {"clipqa.overrides": f"experiment=smoke mapper.num_layers={num}", "hydra.job.num": str(num)}
        params = {"mapper.num_layers": num, "trainer.seed": 1, "trainer.epochs": 1}
        fake_run(c, exp, f"mapper.num_layers={num}", params, sum(correct) / N, correct=correct, tags=tags)
    tracked = main_table(make_report(uri, tmp_path / "mlflow", experiment="e").read_text())
    untracked = main_table(make_folder_report(sweep, tmp_path / "folders").read_text())
    assert untracked == tracked
    csv_cols = (tmp_path / "mlflow" / "report.csv").read_text().splitlines()[0]
    assert (tmp_path / "folders" / "report.csv").read_text().splitlines()[0] == csv_cols


def test_the_end_of_sweep_callback_writes_an_untracked_sweeps_report(tmp_path, caplog):
    """It once returned at once with tracking off: four jobs' results and no report, not a word."""
    sweep = untracked_sweep(tmp_path)
    config = OmegaConf.create({"tracking": {"backend": "none"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="clipqa.sweep.mlflow_parent"):
        MlflowSweepCallback().on_multirun_end(config)
    report = sweep / "report" / "report.md"
    assert main_table(report.read_text())[1][0] == "`mapper.num_layers=1`"
    assert f"sweep report: {report}" in caplog.text
    assert {p.name for p in (sweep / "report").iterdir()} >= {"report.md", "report.csv", "report.tex"}


def test_an_untracked_sweep_stopped_by_a_failed_job_still_leaves_the_report_of_the_jobs_that_ran(tmp_path, caplog):
    """Hydra's basic sweeper raises at a failed job and skips on_multirun_end: the report is written at exit."""
    sweep = untracked_sweep(tmp_path)
    callback = MlflowSweepCallback()
    callback._ended = False  # (as on_multirun_start leaves it)
    callback._close_if_unended(
        OmegaConf.create({"tracking": {"backend": "none"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    )
    assert "job 3: no metrics.json" in (sweep / "report" / "report.md").read_text()
    assert "the sweep stopped before its end" in caplog.text


def test_clipqa_report_sweep_dir_reads_an_untracked_sweep_without_mlflow(tmp_path, capsys, monkeypatch):
    """``--sweep-dir`` once failed for want of .clipqa_mlflow_parent.json; now it writes the callback's report.md."""
    sweep = untracked_sweep(tmp_path)
    MlflowSweepCallback().on_multirun_end(
        OmegaConf.create({"tracking": {"backend": "none"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'no.db'}")  # never opened
    cli.report(["--sweep-dir", str(sweep), "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "report.md").read_text() == (sweep / "report" / "report.md").read_text()
    assert "| `mapper.num_layers=1` |" in capsys.readouterr().out
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "nor job folders (<job>/.hydra/overrides.yaml)"),
        ("bad metrics", "1/metrics.json cannot be read as a job's metrics"),
        ("bad overrides", "is not a list of Hydra overrides"),
        ("filter", "--parent and --filter (MLflow selections) do not apply"),
        ("nothing finished", "No job folder under"),
    ],
)
def test_bad_sweep_folders_are_one_clear_paragraph_exit_2(tmp_path, capsys, case, expected):
    sweep = untracked_sweep(tmp_path) if case != "nothing finished" else tmp_path / "sweep"
    args = []
    if case == "empty":
        sweep = tmp_path / "not_a_sweep"
        sweep.mkdir()
    elif case == "bad metrics":
        (sweep / "1" / "metrics.json").write_text('{"test/acc": 0.5,')
    elif case == "bad overrides":
        (sweep / "2" / ".hydra" / "overrides.yaml").write_text("mapper: 2\n")
    elif case == "filter":
        args = ["--filter", "params.x = '1'"]
    else:
        write_job(sweep, 0, ["mapper.num_layers=0"], None, 0)
    with pytest.raises(SystemExit) as e:
        cli.report(["--sweep-dir", str(sweep), "--out", str(tmp_path / "rep"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "Traceback" not in err
    assert err.startswith("clipqa-report: error: ") and err.count("\n") == 1
    assert not (tmp_path / "rep" / "report.md").exists()


def test_an_mlflow_sweeps_title_names_its_overrides_and_folder_with_the_parent_run_as_a_detail(tmp_path):
    """The title was "clipqa comparison: experiment e, sweep <run id>", read as Hydra's ``experiment=``."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    command = f"experiment=demo freeze=text,staged tracking.uri={uri}"
    tags = {"clipqa.sweep": "true", "clipqa.overrides": command, "hydra.sweep.dir": str(tmp_path / "sw")}
    parent = c.create_run(exp, run_name="sweep: experiment=demo freeze=text,staged", tags=tags).info.run_id
    for freeze, acc in [("text", 0.4), ("staged", 0.5)]:
        tags = {"clipqa.overrides": f"experiment=demo freeze={freeze}"}
        fake_run(c, exp, f"freeze={freeze}", {"freeze.text": str(freeze == "text")}, acc, parent, tags=tags)
    md = make_report(uri, tmp_path / "rep", experiment="e", parent_run_id=parent).read_text()
    title, detail = md.splitlines()[:2]
    assert title == f"# clipqa sweep `experiment=demo freeze=text,staged` in `{tmp_path / 'sw'}`"
    assert "Command: `python train.py -m experiment=demo freeze=text,staged`" in detail  # no tracking.uri
    assert f"MLflow: parent run `{parent}` in experiment `e`" in detail and parent not in title
    assert main_table(md)[0][0] == "`freeze=staged`"
