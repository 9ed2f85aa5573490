"""A team's MLflow server, for real: PostgreSQL behind it, MLflow's basic-auth app in front, artifacts proxied.

One server for the module (tests/helpers/mlflow_server.py: ``mlflow server --app-name basic-auth --backend-store-uri
postgresql+psycopg2://... --artifacts-destination DIR``, ``default_permission = READ``: everyone may look, only an
experiment's owner, those given EDIT and the admin may write). Users log in with MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD; clipqa checks the login and the permission before training
(clipqa.tracking.preflight.server_errors).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.mlflow_server import start_auth_server
from tests.helpers.runs import SMALL_DEMO, run_cli

pytestmark = pytest.mark.slow

SMALL_TRACKED = [*SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=600", "data.synthetic.n_test=100"]
ALICE = ("alice", "alice-pw-7c1e5e0b1d")  # a team member: creates her own experiment, so she may write to it


def login_env(user: str | None, password: str | None) -> dict[str, str | None]:
    """The two variables a client logs in with (None: not set)."""
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def set_env(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def logged_in(user: str | None, password: str | None):
    """This process's MLflow clients log in as ``user`` (they read the two variables at every request)."""
    saved = {k: os.environ.get(k) for k in login_env(None, None)}
    set_env(login_env(user, password))
    try:
        yield
    finally:
        set_env(saved)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """The server, with one team member (alice) created by the admin through the auth REST API."""
    import mlflow.server

    server = start_auth_server(postgres.create_database("mlflow_team"), tmp_path_factory.mktemp("mlflow-team"))
    try:
        with logged_in("admin", server.admin_password):
            mlflow.server.get_app_client("basic-auth", tracking_uri=server.url).create_user(*ALICE)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def team_sweep(team_server, tmp_path_factory):
    """Alice's parallel sweep (joblib, 2 jobs at once) logged through the server: (sweep folder, its output)."""
    sweep = tmp_path_factory.mktemp("team") / "sweep"
    started = time.time()
    r = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SMALL_TRACKED,
        "trainer.max_steps=4",
        "mapper.num_layers=0,1",
        f"tracking.uri={team_server.url}",
        "tracking.experiment=alice-sweeps",
        f"hydra.sweep.dir={sweep}",
        env=login_env(*ALICE),
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    print(f"joblib sweep through the authenticated server: {time.time() - started:.0f} s")
    return sweep, r.stdout + r.stderr


def sweep_runs(server):
    """(client, parent run, child runs) of alice's sweep, read back through the server as alice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    runs = client.search_runs([client.get_experiment_by_name("alice-sweeps").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_a_parallel_sweep_logs_runs_params_metrics_artifacts_and_its_report_through_the_server(
    team_server, team_sweep, tmp_path
):
    """Catches: jobs in joblib's worker processes not logging in (no env passed on), artifacts written to a local
    folder instead of through the server's proxy (clients of a shared server cannot reach its disk), files changed
    on the way, a report missing from the parent run."""
    sweep, _ = team_sweep
    with logged_in(*ALICE):
        client, parent, children = sweep_runs(team_server)
        assert parent.info.status == "FINISHED" and len(children) == 2
        assert sorted(x.info.run_name for x in children) == ["mapper.num_layers=0", "mapper.num_layers=1"]
        for child in children:
            job = sweep / child.data.tags["hydra.job.num"]
            assert child.info.status == "FINISHED"
            assert child.data.params["mapper.num_layers"] == child.info.run_name[-1]
            metrics = json.loads((job / "metrics.json").read_text())
            for key in ("test/acc", "val/acc", "test/prior_acc"):
                assert child.data.metrics[key] == pytest.approx(metrics[key])
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/"), child.info.artifact_uri  # proxied
            names = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"config.yaml", "metrics.json", "test_predictions.tsv", "loss.png"} <= names
            down = Path(client.download_artifacts(child.info.run_id, "", str(tmp_path / child.info.run_id)))
            for name in ("config.yaml", "metrics.json", "test_predictions.tsv", "loss.png"):
                assert (down / name).read_bytes() == (job / name).read_bytes(), name
            # ... and the bytes sit in the server's artifact folder, where only the server writes
            stored = list(team_server.artifacts.rglob(f"{child.info.run_id}/artifacts/test_predictions.tsv"))
            assert len(stored) == 1 and stored[0].read_bytes() == (job / "test_predictions.tsv").read_bytes()
        report = Path(client.download_artifacts(parent.info.run_id, "report", str(tmp_path / "report")))
    for name in ("report.md", "report.csv", "comparison.png"):
        assert (report / name).read_bytes() == (sweep / "report" / name).read_bytes(), name
    md = (report / "report.md").read_text()
    assert "`mapper.num_layers=0`" in md and "`mapper.num_layers=1`" in md


def test_the_mlflow_ui_shows_the_sweep_to_a_logged_in_browser(team_server, team_sweep):
    """The UI test of tests/system/test_mlflow_ui.py against the team server: the browser logs in with HTTP basic auth.
    Catches: a UI that cannot be browsed behind basic-auth, or runs missing from it."""
    from tests.helpers.browser import browser_page, check_accuracies_shown, runs_table_with_test_acc

    with logged_in(*ALICE):
        client, parent, children = sweep_runs(team_server)
    accs = {x.info.run_name: x.data.metrics["test/acc"] for x in children}
    route = f"experiments/{parent.info.experiment_id}/runs"
    credentials = {"username": ALICE[0], "password": ALICE[1]}
    with browser_page(team_server.url, route, 2000, 900, credentials) as page:
        grid = runs_table_with_test_acc(page, accs, "mlflow_ui_team_runs.png")
    check_accuracies_shown(grid, accs)


def assert_stopped_before_training(r, run_dir: Path, *expected: str) -> str:
    """Exit status 2, one error paragraph (no traceback) containing ``expected``, nothing trained."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if "clipqa: error:" in x]
    for text in expected:
        assert text in line, (text, line)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "history.jsonl").exists()
    return line


@pytest.mark.parametrize("login", [(None, None), ("alice", "wrong-password")], ids=["no-login", "wrong-password"])
def test_no_or_a_wrong_login_stops_before_training_with_one_clear_error_quickly(team_server, tmp_path, login):
    """Catches: MLflow's HTTP retries turning a refused login into minutes of waiting, a traceback, training that
    runs and only then fails to log, or a message that does not say which server and which variables."""
    from clipqa.errors import ClipqaError
    from clipqa.tracking.tracker import MlflowTracker

    args = [*SMALL_TRACKED, f"tracking.uri={team_server.url}", "tracking.experiment=alice-sweeps"]
    started = time.time()
    r = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", env=login_env(*login))
    elapsed = time.time() - started
    line = assert_stopped_before_training(
        r, tmp_path / "run", team_server.url, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "401"
    )
    assert elapsed < 90, elapsed  # the whole process, imports included (~15 s here); retries would take minutes
    assert (login[1] or "no password") not in line

    # A sweep stops in its launching process, before any job starts (no job folder).
    r = run_cli("-m", *args, "mapper.num_layers=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=login_env(*login))
    assert_stopped_before_training(r, tmp_path / "sweep" / "0", team_server.url, "MLFLOW_TRACKING_PASSWORD")
    assert not (tmp_path / "sweep" / "0").exists()

    # The check itself, timed in this process: one request, no retries.
    with logged_in(*login), pytest.raises(ClipqaError, match="HTTP 401"):
        started = time.time()
        try:
            MlflowTracker(team_server.url, "alice-sweeps", "x", {})
        finally:
            elapsed = time.time() - started
    print(f"refused login reported in {elapsed:.2f} s")
    assert elapsed < 5, elapsed


def test_a_user_without_permission_cannot_write_to_someone_elses_experiment(team_server, tmp_path):
    """The admin's experiment, no permission given to bob (default READ): bob's run and bob's sweep stop with an
    error naming the experiment, the user and the permission he lacks; no run appears in the experiment.
    Catches: a shared server where anyone logged in can write into anyone's experiment, or a 403 reported as a
    traceback after training."""
    import mlflow.server
    from mlflow.tracking import MlflowClient

    with logged_in("admin", team_server.admin_password):
        mlflow.server.get_app_client("basic-auth", tracking_uri=team_server.url).create_user(
            "bob", "bob-pw-52d1-0f3a9e"
        )
        exp_id = MlflowClient(team_server.url).create_experiment("admins-only")
    bob = login_env("bob", "bob-pw-52d1-0f3a9e")
    args = [*SMALL_TRACKED, f"tracking.uri={team_server.url}", "tracking.experiment=admins-only"]
    r = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", env=bob)
    assert_stopped_before_training(r, tmp_path / "run", "'bob'", "'admins-only'", "403", "EDIT permission")
    r = run_cli("-m", *args, "mapper.num_layers=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=bob)
    assert_stopped_before_training(r, tmp_path / "sweep" / "0", "'bob'", "'admins-only'", "403")
    with logged_in("admin", team_server.admin_password):
        assert MlflowClient(team_server.url).search_runs([exp_id]) == []


def test_credentials_never_appear_in_any_file_a_run_or_a_sweep_leaves_nor_in_mlflow(team_server, team_sweep, tmp_path):
    """Grep every file of alice's sweep and of a single run (which also logs best.pt), their
    console output, and every param and tag of the logged runs for the password and the user:password pair.
    Also: a URI with credentials in it is refused (exit 2) and scrubbed from the files Hydra had already written.
    Catches: a login written into config.yaml, .hydra/*.yaml, train.log, metrics.json, the report, a pending-writes
    file or an MLflow param."""
    from mlflow.tracking import MlflowClient

    sweep, sweep_output = team_sweep
    run = tmp_path / "run"
    r = run_cli(
        *SMALL_TRACKED,
        "trainer.max_steps=4",
        "tracking.log_model=false",  # (the MLflow model's upload and check add a minute; best.pt still goes up)
        f"tracking.uri={team_server.url}",
        "tracking.experiment=alice-single",
        f"hydra.run.dir={run}",
        env=login_env(*ALICE),
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    refused = tmp_path / "refused"
    host = team_server.url.removeprefix("http://")
    r2 = run_cli(*SMALL_TRACKED, f"tracking.uri=http://{ALICE[0]}:{ALICE[1]}@{host}", f"hydra.run.dir={refused}")
    assert_stopped_before_training(r2, refused, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", host)

    secrets = [ALICE[1].encode(), f"{ALICE[0]}:{ALICE[1]}".encode()]
    files = [f for d in (sweep, run, refused) for f in d.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "train.log", "metrics.json", "report.md"} <= names
    assert (refused / ".hydra" / "overrides.yaml").is_file()
    for f in files:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f"credentials in {f}"
    for text in (sweep_output, r.stdout + r.stderr, r2.stdout + r2.stderr):
        assert not any(s.decode() in text for s in secrets)

    with logged_in(*ALICE):
        client = MlflowClient(team_server.url)
        exps = [client.get_experiment_by_name(n).experiment_id for n in ("alice-sweeps", "alice-single")]
        runs = client.search_runs(exps)
        assert len(runs) == 4  # the sweep's parent, its two jobs, the single run
        for x in runs:
            values = [*x.data.params.values(), *x.data.tags.values(), *x.data.params, *x.data.tags]
            assert not any(s.decode() in v for s in secrets for v in values), x.info.run_name
        single = next(x for x in runs if x.info.experiment_id == exps[1])
        logged = {a.path for a in client.list_artifacts(single.info.run_id)}
        assert "checkpoint" in logged  # the single run's best.pt went through the proxy as well
