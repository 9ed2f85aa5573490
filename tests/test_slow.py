"""Slow tier (`python -m pytest -m slow`; CI runs it): Hydra multiruns and the full demo as users run them."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from clipqa.checkpoint import load_checkpoint
from clipqa.run import train
from tests.conftest import ROOT
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow


def report_command() -> str:
    """The installed clipqa-report console script (next to this Python if PATH lacks it)."""
    exe = shutil.which("clipqa-report") or shutil.which("clipqa-report", path=str(Path(sys.executable).parent))
    assert exe, "the clipqa-report console script is not installed (pip install -e .)"
    return exe


def test_multirun_over_mapper_depth_leaves_three_runs_nested_in_mlflow_and_a_report(tmp_path):
    small = [
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=100",
        "data.synthetic.image_size=64",
        "trainer.max_steps=6",
        "trainer.num_workers=0",
    ]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_cli(
        "-m",
        "experiment=demo",
        "mapper.num_layers=0,1,2",
        *small,
        f"tracking.uri={uri}",
        "tracking.experiment=e",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    layers = []
    for job in range(3):
        d = tmp_path / "sweep" / str(job)
        metrics = json.loads((d / "metrics.json").read_text())
        assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["steps"] == 6
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
        assert child.info.status == "FINISHED" and "test/acc" in child.data.metrics
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
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| `")] == [
        f"| `mapper.num_layers={n}`" for n in range(3)
    ]


def test_sigint_marks_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=demo",
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=100",
        "data.synthetic.image_size=64",
        "trainer.epochs=1000",
        "trainer.num_workers=0",
        f"tracking.uri={uri}",
        "tracking.experiment=k",
        f"hydra.run.dir={tmp_path}/run",
    ]
    out = tmp_path / "output.txt"  # a file, not a pipe: a full pipe would block the run's last log lines
    with open(out, "w") as sink:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(uri)
    deadline = time.time() + 180
    while True:  # wait until training has logged a loss, then press Ctrl-C
        assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
        exp = client.get_experiment_by_name("k") if (tmp_path / "m.db").exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and "train/loss" in runs[0].data.metrics:
            break
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(180)  # a loaded CI machine: the KILLED write may queue and retry (MlflowTracker.finish)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not stop within 180 s of Ctrl-C; its output ends with:\n{out.read_text()[-3000:]}")
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_the_readme_demo_beats_the_answer_prior_by_a_quarter(tmp_path, monkeypatch):
    """`python train.py experiment=demo` from an empty cache (data generation included), as in the README."""
    monkeypatch.setenv("CLIPQA_CACHE_DIR", str(tmp_path / "cache"))
    r = run_cli("experiment=demo", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test/acc"] >= m["test/prior_acc"] + 0.25, m
    assert m["data/n_test"] == 1000


def test_parallel_joblib_jobs_nest_under_one_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"  # a fresh store: created once by the parent before the workers start
    r = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "experiment=demo",
        "trainer.seed=1,2",
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=100",
        "data.synthetic.image_size=64",
        "trainer.max_steps=4",
        "trainer.num_workers=0",
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


def test_trainer_compile_trains_the_same_model(small_demo_cfg, tmp_path):
    """torch.compile on the text encoder (lean path included): same losses as eager; its best.pt loads as usual."""
    runs = {}
    for compiled in (False, True):
        cfg = small_demo_cfg("trainer.max_steps=3", "trainer.eval_every=3", f"trainer.compile={compiled}")
        runs[compiled] = train(cfg, tmp_path / str(compiled))
    for key in ("test/loss", "val/acc"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-3), key
    load_checkpoint(tmp_path / "True" / "best.pt")  # the compiled run's weights load into a plain model
