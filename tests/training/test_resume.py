"""Resume: an interrupted run continues from its last checkpoint and ends with exactly the uninterrupted metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clipqa.training.run import train
from tests.helpers.runs import ROOT, SMALL_DEMO_RUN, compose_cfg, mlflow_store

TIMING = ("train/seconds", "train/examples_per_s")
RUN = SMALL_DEMO_RUN  # 2 epochs x 29 steps, validated every 10, a checkpoint every 7: the session's demo_run


def same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_a_crashed_run_resumes_from_its_checkpoint_with_identical_metrics(demo_run, tmp_path, cache_dir):
    cfg = compose_cfg(RUN, cache_dir)
    assert cfg == demo_run[0]
    reference = demo_run[2]  # the same config, run uninterrupted (tests/conftest.py)

    def crash_at_step_40(val_acc, step):
        if step == 40:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "run", on_validation=crash_at_step_40)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))[-1] == "step_00000035.pt"
    resumed = train(cfg, tmp_path / "run")
    assert same(resumed, reference), {k: (resumed[k], reference[k]) for k in reference if resumed[k] != reference[k]}
    # Running it once more finds the finished results and does not train again.
    assert train(cfg, tmp_path / "run") == pytest.approx(resumed, nan_ok=True)


@pytest.mark.slow
def test_a_staged_run_resumed_at_the_phase_boundary_ends_with_the_uninterrupted_metrics(tmp_path, cache_dir):
    """The checkpoint between two phases resumes into the next phase as set up by an uninterrupted run: its
    freeze policy, a fresh optimizer over the newly unfrozen text model at its own learning rate, a fresh best."""
    cfg = compose_cfg([*RUN, "freeze=staged", "trainer.checkpoint_every=1000"], cache_dir)
    reference = train(cfg, tmp_path / "reference")
    steps_per_epoch = reference["steps"] // 2

    def crash_in_the_second_phase(val_acc, step):
        if step > steps_per_epoch:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "run", on_validation=crash_in_the_second_phase)
    newest = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1]
    assert newest.name == f"step_{steps_per_epoch:08d}.pt"  # the boundary: the first phase done, the second not begun
    resumed = train(cfg, tmp_path / "run")
    assert same(resumed, reference), {k: (resumed[k], reference[k]) for k in reference if resumed[k] != reference[k]}


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path, cache_dir):
    def stop(val_acc, step):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train(compose_cfg(RUN, cache_dir), tmp_path, on_validation=stop)
    from clipqa.errors import ClipqaError

    with pytest.raises(ClipqaError, match="optimizer.lr"):
        train(compose_cfg([*RUN, "optimizer.lr=0.01"], cache_dir), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_or_preempted_run_resumes_to_the_same_metrics(sig, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path)
    args = [
        *RUN,
        "trainer.epochs=4",
        "trainer.checkpoint_every=5",
        "tracking=mlflow",
        f"tracking.uri={uri}",
        "tracking.experiment=r",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "tracking=none", f"hydra.run.dir={tmp_path}/ref"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(p.name >= "step_00000040.pt" for p in ckpts.glob("step_*.pt"))):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(120)
    assert not (tmp_path / "run" / "metrics.json").exists()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    if sig == "SIGTERM":
        assert rc == 75
        assert run.info.status == "KILLED" and run.data.tags.get("clipqa.resumable") == "true"
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert same(a, b), {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    runs = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    assert runs[0].data.metrics["test/acc"] == pytest.approx(b["test/acc"])


@pytest.mark.slow
def test_rerunning_a_stopped_sweep_runs_only_the_missing_jobs(tmp_path):
    from mlflow.tracking import MlflowClient

    sweep, uri = tmp_path / "sweep", mlflow_store(tmp_path)
    args = [sys.executable, str(ROOT / "train.py"), "-m", *RUN, "trainer.seed=1,2,3,4", "trainer.max_steps=8"]
    args += ["tracking=mlflow", f"tracking.uri={uri}", "tracking.experiment=sw", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(sweep.glob("*/.clipqa_done"))) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait(60)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/.clipqa_done")}
    assert 2 <= len(finished) < 4
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    for job, mtime in finished.items():  # finished jobs were not trained again
        assert (sweep / job / ".clipqa_done").stat().st_mtime_ns == mtime
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]  # the re-run kept its parent
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(x.info.run_name for x in children) == [f"trainer.seed={i}" for i in (1, 2, 3, 4)]
    assert all(x.info.status == "FINISHED" for x in children) and parent.info.status == "FINISHED"
