"""Hydra multiruns as users run them (`python train.py -m ...`): one folder and one nested MLflow run per job, the
sweep's parent run with its comparison report, the `clipqa-report` command, and parallel joblib jobs (slow)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers.runs import SMALL_DEMO, check_test_metrics, run_cli

pytestmark = pytest.mark.slow

# The small demo, smaller still (every job trains), tracked: these tests read the runs back from MLflow.
SMALL_TRACKED = [*SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=600", "data.synthetic.n_test=100"]


def report_command() -> str:
    """The installed clipqa-report console script (next to this Python if PATH lacks it)."""
    exe = shutil.which("clipqa-report") or shutil.which("clipqa-report", path=str(Path(sys.executable).parent))
    assert exe, "the clipqa-report console script is not installed (pip install -e .)"
    return exe


def test_multirun_over_mapper_depth_leaves_three_runs_nested_in_mlflow_and_a_report(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_cli(
        "-m",
        *SMALL_TRACKED,
        "trainer.max_steps=6",
        "mapper.num_layers=0,1,2",
        f"tracking.uri={uri}",
        "tracking.experiment=e",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    layers = []
    for job in range(3):
        d = tmp_path / "sweep" / str(job)
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["steps"] == 6
        check_test_metrics(d)  # each job's test metrics are those of its own predictions file
        assert (d / "best.pt").is_file()
        layers.append(yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["mapper"]["num_layers"])
        assert (metrics["params/trainable/mapper"] == 0) == (layers[-1] == 0)
    assert layers == [0, 1, 2]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(x.data.params["mapper.num_layers"] for x in children) == ["0", "1", "2"]
    assert sorted(x.info.run_name for x in children) == [f"mapper.num_layers={n}" for n in range(3)]
    for child in children:
        job = json.loads((tmp_path / "sweep" / child.data.tags["hydra.job.num"] / "metrics.json").read_text())
        assert child.info.status == "FINISHED" and child.data.metrics["test/acc"] == pytest.approx(job["test/acc"])
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "loss.png", "accuracy.png", "metrics.json"} <= names
        assert "checkpoint" not in names  # sweep jobs keep best.pt in their folder only (tracking.log_checkpoint)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md",
        "report/report.csv",
        "report/comparison.png",
    }

    out = tmp_path / "report"
    rep = subprocess.run(
        [report_command(), "--tracking-uri", uri, "--experiment", "e", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr[-2000:]
    for f in ("report.md", "report.csv", "comparison.png"):
        assert (out / f).is_file()
    md = (out / "report.md").read_text()
    first_table = md.split("\n\n")[1]  # one row per variant (the per-type and training tables follow)
    assert [line.split(" | ")[0] for line in first_table.splitlines() if line.startswith("| `")] == [
        f"| `mapper.num_layers={n}`" for n in range(3)
    ]


def test_parallel_joblib_jobs_nest_under_one_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"  # a fresh store: created once by the parent before the workers start
    r = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SMALL_TRACKED,
        "trainer.seed=1,2",
        "trainer.max_steps=4",
        f"tracking.uri={uri}",
        "tracking.experiment=j",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("j").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(x.info.run_name for x in children) == ["trainer.seed=1", "trainer.seed=2"]
    assert all(x.info.status == "FINISHED" for x in children + [parent])


def test_a_grid_sweep_with_a_failing_job_closes_its_parent_failed_with_a_report(tmp_path):
    """Hydra's basic sweeper raises at a failed job and skips the end-of-sweep callback: the parent run once stayed
    RUNNING forever, without a report. Now it ends FAILED, tagged, with the report of the jobs that ran."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_cli(
        "-m", *SMALL_TRACKED, "trainer.max_steps=4", "trainer.init_from=null,/nonexistent/best.pt",
        f"tracking.uri={uri}", "tracking.experiment=f", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert r.returncode != 0 and "no such file" in r.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("f").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["clipqa.jobs"] == "2 jobs: 1 finished, 0 pruned, 1 failed"
    assert "before all of its jobs ran" in parent.data.tags["clipqa.error"]
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "trainer.init_from=null" in (tmp_path / "sweep" / "report" / "report.md").read_text()
