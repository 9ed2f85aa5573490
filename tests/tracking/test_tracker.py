"""MLflow tracking of single runs (status, params, metrics, artifacts); the report is
tests/report/test_comparison.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from clipqa.errors import ClipqaError
from clipqa.paths import PROJECT_DIR
from clipqa.tracking.run_info import RunInfo, run_name
from clipqa.tracking.tracker import MlflowTracker, flatten
from clipqa.tracking.uris import resolve_uri
from clipqa.training.run import train
from tests.helpers.runs import ROOT, SMALL_DEMO, compose_cfg, mlflow_store


def test_run_names_come_from_the_overrides_never_random():
    info = RunInfo(
        overrides=["experiment=demo", "mapper.num_layers=2", "freeze=text", "tracking.uri=x", "hydra.run.dir=y"]
    )
    assert run_name(info) == "experiment=demo,mapper.num_layers=2,freeze=text"
    assert run_name(info, swept=["mapper.num_layers", "freeze"]) == "mapper.num_layers=2,freeze=text"
    assert run_name(RunInfo()) == "defaults"


def test_flatten_and_store_uri_are_absolute_and_dotted(tmp_path, monkeypatch):
    assert flatten({"mapper": {"num_layers": 2}, "optimizer": {"betas": [0.9, 0.99]}}) == {
        "mapper.num_layers": 2,
        "optimizer.betas": [0.9, 0.99],
    }
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"
    assert resolve_uri(None) == f"sqlite:///{PROJECT_DIR}/mlflow.db"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_one_rule_for_the_store_flag_then_the_environment_then_the_project(tmp_path, monkeypatch):
    """Catches: clipqa-eval/-predict/-report mapping a missing --tracking-uri straight to the project's mlflow.db,
    ignoring the MLFLOW_TRACKING_URI a user of a shared server exports once (train.py honoured it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env/m.db")
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/env/m.db"  # relative to the working directory, as MLflow's
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # the flag wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_uri(None) == f"sqlite:///{PROJECT_DIR}/mlflow.db"


def test_the_read_only_tools_refuse_a_store_that_is_not_there_instead_of_creating_it(tmp_path, monkeypatch):
    """Catches: clipqa-report creating an empty mlflow.db where it found no store (then a confusing "no experiment
    'clipqa'" instead of "wrong store")."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nowhere.db'}")
    with pytest.raises(ClipqaError, match=r"No MLflow store at .*nowhere.db \(from \$MLFLOW_TRACKING_URI\)"):
        resolve_uri(None, "--tracking-uri", must_exist=True)
    with pytest.raises(ClipqaError, match=r"No MLflow store at .*other.db \(from --tracking-uri\)"):
        resolve_uri(f"sqlite:///{tmp_path / 'other.db'}", "--tracking-uri", must_exist=True)
    assert not list(tmp_path.iterdir())
    assert resolve_uri("http://127.0.0.1:5000", must_exist=True) == "http://127.0.0.1:5000"  # a server: it decides


def test_a_tracking_uri_with_credentials_is_refused_without_repeating_them():
    """Catches: ``tracking.uri=http://bob:secret@host`` accepted: the login would stay in config.yaml, Hydra's
    .hydra/overrides.yaml and the MLflow params. The error shows the URI to use and the two variables instead."""
    with pytest.raises(ClipqaError) as refused:
        resolve_uri("http://bob:hunter2@127.0.0.1:5000")
    msg = str(refused.value)
    assert "hunter2" not in msg and "bob" not in msg
    assert "tracking.uri=http://127.0.0.1:5000" in msg
    assert "MLFLOW_TRACKING_USERNAME" in msg and "MLFLOW_TRACKING_PASSWORD" in msg


def test_credentials_in_the_environment_variable_are_refused_the_same_way(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:5000")
    with pytest.raises(ClipqaError) as refused:
        resolve_uri(None, "--tracking-uri")
    msg = str(refused.value)
    assert "hunter2" not in msg and "bob" not in msg
    assert msg.startswith("$MLFLOW_TRACKING_URI has a user name or password")
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in msg


@pytest.mark.parametrize(
    ("code", "login", "expected"),
    [
        ("UNAUTHENTICATED", (None, None), "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set"),
        ("UNAUTHENTICATED", ("bob", None), "MLFLOW_TRACKING_PASSWORD is not set"),
        ("UNAUTHENTICATED", ("bob", "s3cr3t-pw"), "did not accept user 'bob'"),
        ("PERMISSION_DENIED", ("bob", "s3cr3t-pw"), "refused user 'bob' access to experiment 'team'"),
        ("INTERNAL_ERROR", ("bob", "s3cr3t-pw"), "Cannot reach the MLflow tracking server"),
    ],
)
def test_a_refused_login_or_permission_becomes_one_clear_error(monkeypatch, code, login, expected):
    """What a tracking server answers at start-up (401, 403, no answer) -> ClipqaError naming the server without
    credentials, the variables or the experiment. Catches: MLflow's raw exception (a traceback) reaching the user."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from clipqa.tracking.preflight import server_errors

    for name, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), login, strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    # MLflow's wording: "... failed with error code 401 != 200" for an answer, "... failed with exception ..." for none
    answer = "failed with exception ConnectionError" if code == "INTERNAL_ERROR" else "failed with error code 4xx"
    with pytest.raises(ClipqaError) as e, server_errors("http://127.0.0.1:5000", "team"):
        raise MlflowException(f"API request to endpoint /x {answer}", error_code=getattr(databricks_pb2, code))
    msg = str(e.value)
    assert expected in msg and "http://127.0.0.1:5000 <tracking.uri>" in msg and "Nothing was trained" in msg
    assert "s3cr3t-pw" not in msg


def tracked(tmp_path, *extra):
    uri = mlflow_store(tmp_path)
    cfg = compose_cfg([*SMALL_DEMO, "tracking=mlflow", f"tracking.uri={uri}", "tracking.experiment=t", *extra])
    return cfg, MlflowClient(uri)


def only_run(client):
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id])
    return run


def test_a_single_run_is_logged_with_params_metrics_curves_and_checkpoint(tmp_path):
    cfg, client = tracked(tmp_path, "trainer.max_steps=8", "trainer.eval_every=4")
    overrides = ["experiment=demo", "trainer.max_steps=8"]  # what Hydra would pass as the command line
    metrics = train(cfg, tmp_path / "run", RunInfo(overrides=overrides))
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "experiment=demo,trainer.max_steps=8"
    assert run.data.params["mapper.num_layers"] == "2" and run.data.params["optimizer.lr"] == "0.002"
    assert run.data.params["params/trainable/mapper"] == str(metrics["params/trainable/mapper"])
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test/acc", "test/acc/color", "val/acc", "test/prior_acc"):
        assert run.data.metrics[key] == pytest.approx(on_disk[key])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert steps == [4, 8] or steps[:2] == [4, 8]
    assert client.get_metric_history(run.info.run_id, "train/loss")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "loss.png", "accuracy.png", "checkpoint"} <= names
    assert run.data.tags["clipqa.overrides"] == " ".join(overrides)
    # The code version: the project's checked-out commit (a clean clone in CI; skipped where git is missing).
    head = (
        subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if shutil.which("git")
        else None
    )
    if head is None or head.returncode != 0:
        pytest.skip("git or the project's git checkout is unavailable: the commit tag is not checked")
    assert run.data.tags.get("mlflow.source.git.commit") == head.stdout.strip()


def test_a_run_that_raises_ends_failed_with_the_message(tmp_path):
    cfg, client = tracked(tmp_path, "data.synthetic=null", f"data.root={tmp_path}/nope", f"data.image_root={tmp_path}")
    with pytest.raises(ClipqaError):
        train(cfg, tmp_path / "run")
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert "COCO-QA train split not found" in run.data.tags["error"]


def test_ctrl_c_marks_the_run_killed(tmp_path, monkeypatch):
    import clipqa.training.run as T

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "load_data", interrupted)
    cfg, client = tracked(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    assert only_run(client).info.status == "KILLED"


@pytest.mark.slow
def test_sigint_marks_the_run_killed(tmp_path):
    """Ctrl-C on `python train.py` itself, mid-training (test_ctrl_c_marks_the_run_killed raises it in-process)."""
    uri = mlflow_store(tmp_path)
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *SMALL_DEMO,
        "tracking=mlflow",
        "data.synthetic.n_train=600",
        "data.synthetic.n_test=100",
        "trainer.epochs=1000",
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


def test_tracking_none_writes_no_store(tmp_path):
    cfg = compose_cfg([*SMALL_DEMO, "trainer.max_steps=2", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    train(cfg, tmp_path / "run")
    assert not (tmp_path / "m.db").exists() and (tmp_path / "run" / "metrics.json").is_file()


def test_overlong_param_values_are_truncated_not_fatal(tmp_path):
    t = MlflowTracker(mlflow_store(tmp_path), "t", "long", {})
    t.log_params({"data.root": "x" * 7000, "ok": 1})
    t.finish()
    run = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(t.run_id)
    assert len(run.data.params["data.root"]) <= 6000 and run.data.params["data.root"].endswith("see config.yaml)")


def test_ctrl_c_during_an_mlflow_write_waits_for_the_write_then_marks_the_run_killed(tmp_path):
    """A Ctrl-C that lands inside a write is raised after it: no half-done transaction locks the store, and the
    KILLED status is written at once (before, that last write could wait minutes on SQLite's lock)."""
    t = MlflowTracker(mlflow_store(tmp_path), "t", "interrupted", {})
    real, finished = t.client.log_batch, []

    def write_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        real(*args, **kwargs)
        finished.append(True)

    t.client.log_batch = write_hit_by_ctrl_c
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            t.log_metrics({"train/loss": 1.0}, step=1)
        assert finished == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    t.client.log_batch = real
    t.finish("KILLED", error="interrupted (KeyboardInterrupt)")
    run = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(t.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["train/loss"] == 1.0 and not t.pending
