"""MLflow writes a run could not make are kept as plain JSON and uploaded later by clipqa-sync."""

import json

import pytest
from mlflow.tracking import MlflowClient

from clipqa import cli
from clipqa.tracking.pending import PENDING_FILE
from clipqa.tracking.tracker import MlflowTracker
from clipqa.tracking.uris import without_credentials
from tests.helpers.runs import mlflow_store


def test_unwritten_mlflow_writes_are_kept_as_json_and_uploaded_by_clipqa_sync(tmp_path, monkeypatch, capsys):
    uri = mlflow_store(tmp_path)
    t = MlflowTracker(uri, "p", "offline", {})
    t.RETRY_AFTER_S = 0.0
    (tmp_path / "curve.txt").write_text("a file to upload")

    def server_down(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    for method in ("log_batch", "log_artifact", "set_terminated"):
        monkeypatch.setattr(t.client, method, server_down)
    t.log_params({"mapper.num_layers": 2})
    t.log_metrics({"val/acc": 0.5}, step=3)
    t.set_tags({"note": "queued"})
    t.log_artifact(tmp_path / "curve.txt")
    t.finish("FINISHED", run_dir=tmp_path)
    data = json.loads((tmp_path / PENDING_FILE).read_text())  # JSON: nothing to unpickle
    assert [op["method"] for op in data["ops"]] == ["log_batch"] * 3 + ["log_artifact", "set_terminated"]
    assert not list(tmp_path.glob("*.pkl"))

    cli.sync([str(tmp_path)])  # the server is back
    assert "uploaded 5 MLflow writes" in capsys.readouterr().out
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.params["mapper.num_layers"] == "2" and run.data.metrics["val/acc"] == 0.5
    assert run.data.tags["note"] == "queued" and run.info.status == "FINISHED"
    assert [a.path for a in MlflowClient(uri).list_artifacts(t.run_id)] == ["curve.txt"]
    assert not (tmp_path / PENDING_FILE).exists()


@pytest.mark.slow  # ~2.4 s
def test_a_pending_file_may_only_name_mlflow_writes(tmp_path, capsys):
    ops = [{"method": "delete_experiment", "args": ["0"], "kwargs": {}}]
    (tmp_path / PENDING_FILE).write_text(json.dumps({"uri": f"sqlite:///{tmp_path / 'm.db'}", "ops": ops}))
    with pytest.raises(SystemExit) as exit_:
        cli.sync([str(tmp_path)])
    assert exit_.value.code == 2 and "unknown MLflow write 'delete_experiment'" in capsys.readouterr().err
    assert (tmp_path / PENDING_FILE).exists()


def test_credentials_are_not_written_with_the_tracking_uri():
    assert without_credentials("http://alice:s3cret@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert without_credentials("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
