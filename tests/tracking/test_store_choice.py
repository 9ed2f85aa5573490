"""Which MLflow store the read-only tools use: --tracking-uri, else $MLFLOW_TRACKING_URI, else the project's
mlflow.db (clipqa.tracking.uris.resolve_uri, the rule train.py follows too).

Catches: clipqa-eval, clipqa-predict and clipqa-report ignoring the variable a user of a shared server exports once,
so a run trained against that server could not be evaluated, predicted or reported without repeating the URI."""

import json

import pytest
from mlflow.tracking import MlflowClient

from clipqa import cli, paths
from tests.helpers.runs import mlflow_store
from tests.inference.test_trained import run_tool
from tests.report.test_comparison import fake_run


@pytest.fixture
def tracked_demo(demo_run, cache_dir, tmp_path):
    """The session's demo run logged by hand into a store of its own: its best.pt as runs:/<id>/checkpoint/best.pt
    (where single runs log it) and registered as models:/env-qa/1. (uri, run id, the run's metrics, an image and a
    question from its data.)"""
    _, out, metrics = demo_run
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("clipqa", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp, run_name="demo").info.run_id
    client.log_artifact(run_id, str(out / "best.pt"), "checkpoint")
    client.set_terminated(run_id)
    client.create_registered_model("env-qa")
    client.create_model_version("env-qa", f"{client.get_run(run_id).info.artifact_uri}/checkpoint", run_id)
    (data,) = (cache_dir / "demo").glob("v1-train1000-test200-*")
    image = sorted((data / "images" / "val2014").iterdir())[0]
    question = (data / "test" / "questions.txt").read_text().splitlines()[0]
    return uri, run_id, metrics, image, question


def test_eval_and_predict_read_runs_and_models_from_the_environment_variables_store(
    tracked_demo, tmp_path, capsys, monkeypatch
):
    uri, run_id, metrics, image, question = tracked_demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # and no --tracking-uri
    code, _, err = run_tool(cli.evaluate, capsys, f"runs:/{run_id}", "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    answers = {}
    for ref in (f"runs:/{run_id}", "models:/env-qa/1"):
        args = (ref, "--image", str(image), "--question", question, "--top-k", "1", "--json")
        code, stdout, err = run_tool(cli.predict, capsys, *args)
        assert code == 0, (ref, err)
        answers[ref] = json.loads(stdout)["answers"]
    assert answers[f"runs:/{run_id}"] == answers["models:/env-qa/1"]
    code, _, err = run_tool(cli.evaluate, capsys, "models:/env-qa/1", "--out", str(tmp_path / "m"), "--split", "val")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["val/acc"] == metrics["val/acc"]


def test_report_reads_the_experiment_from_the_environment_variables_store(tmp_path, capsys, monkeypatch):
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("team", artifact_location=(tmp_path / "art").as_uri())
    for layers, acc in ((0, 0.25), (2, 0.5)):
        fake_run(client, exp, f"mapper.num_layers={layers}", {"mapper.num_layers": layers}, acc)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, stdout, err = run_tool(cli.report, capsys, "--experiment", "team", "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "`mapper.num_layers=2`" in (tmp_path / "rep" / "report.md").read_text() and "50.0" in stdout


def test_report_without_a_store_says_so_and_creates_no_empty_database(tmp_path, capsys, monkeypatch):
    """Catches: clipqa-report opening (so creating) an empty mlflow.db in the project folder, then saying "no
    experiment 'clipqa'" instead of "this is not your store"."""
    monkeypatch.setattr(paths, "PROJECT_DIR", tmp_path)  # the project's default store: not there
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, _, err = run_tool(cli.report, capsys, "--out", str(tmp_path / "rep"))
    assert code == 2 and f"No MLflow store at sqlite:///{tmp_path}/mlflow.db" in err, err
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("tool", ["evaluate", "predict", "report"])
def test_credentials_in_the_environment_variable_are_refused_by_every_tool(tool, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.jpg").write_bytes(b"")  # clipqa-predict checks its images before anything else
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:5000")
    args = {
        "evaluate": ["runs:/0123456789abcdef"],
        "predict": ["models:/qa/1", "--image", str(tmp_path / "p.jpg"), "--question", "what is it"],
        "report": ["--out", str(tmp_path / "rep")],
    }[tool]
    code, _, err = run_tool(getattr(cli, tool), capsys, *args)
    assert code == 2 and "$MLFLOW_TRACKING_URI has a user name or password" in err, err
    assert "hunter2" not in err and "bob" not in err


def test_fetching_a_model_leaves_the_users_environment_variable_alone(tracked_demo, tmp_path, monkeypatch):
    """Catches: mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; restoring only the URI after a runs:/ download
    left the variable pointing at whatever store the process had set before, so the next clipqa-predict in the same
    process (a notebook, this test session) read the wrong store."""
    import mlflow

    from clipqa.inference.trained import find_checkpoint

    uri, run_id, *_ = tracked_demo
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_store(tmp_path, "elsewhere.db"))  # a process-wide URI some earlier code set
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert find_checkpoint(f"runs:/{run_id}", None, tmp_path / "a").name == "best.pt"
        assert __import__("os").environ["MLFLOW_TRACKING_URI"] == uri
        assert find_checkpoint("models:/env-qa/1", None, tmp_path / "b").name == "best.pt"
    finally:
        mlflow.set_tracking_uri(before)
