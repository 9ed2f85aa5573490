"""Tracking faults never kill training: the MLflow server is stopped mid-run and restarted."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.mlflow_server import free_port, start_server, stop
from tests.helpers.runs import ROOT, SMALL_DEMO

pytestmark = pytest.mark.slow


def test_training_survives_a_tracking_server_restart_and_the_run_gets_its_final_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    db, port = f"sqlite:///{tmp_path / 'm.db'}", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(db, port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *SMALL_DEMO,
        "trainer.epochs=6",
        "trainer.eval_every=5",
        "tracking=mlflow",
        f"tracking.uri={uri}",
        "tracking.experiment=f",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 180
        while True:  # wait until the run has logged some validation results
            exp = client.get_experiment_by_name("f")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and "val/acc" in runs[0].data.metrics:
                break
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.5)
        run_id = runs[0].info.run_id
        stop(server)  # the server goes away mid-run ...
        time.sleep(8)
        assert proc.poll() is None, "training died with the tracking server"
        server = start_server(db, port)  # ... and comes back
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 0, out[-3000:]
        assert "MLflow write failed" in out
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert {"test/acc", "val/acc", "test/prior_acc"} <= set(metrics)
        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
        assert not (tmp_path / "run" / "mlflow_pending.json").exists()
    finally:
        stop(server)


def test_runs_started_together_on_a_fresh_sqlite_store_all_get_their_run(tmp_path):
    """Two single runs (or two sweep workers) started at once on a new mlflow.db: MLflow's schema set-up once
    collided ("Online migration expected to match one row", "duplicate column name") and all but one crashed."""
    db = tmp_path / "m.db"
    start = time.time() + 8  # after every process has imported MLflow: they reach the store together
    code = f"""
import time
from clipqa.tracking.tracker import MlflowTracker
while time.time() < {start}:
    time.sleep(0.002)
MlflowTracker("sqlite:///{db}", "e", "x", {{}}).finish("FINISHED")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    assert len(client.search_runs([client.get_experiment_by_name("e").experiment_id])) == 3
