"""Using a trained model: clipqa-eval reproduces a run's numbers, clipqa-predict answers questions, MLflow models.
Checkpoints that would run code when loaded: tests/training/test_checkpoint.py."""

import json
import shutil

import pytest

from clipqa import cli
from clipqa.training.run import train
from tests.helpers.runs import SMALL_DEMO, compose_cfg, mlflow_store


@pytest.fixture(scope="module")
def trained(demo_run, cache_dir):
    """The session's finished short demo run (tests/conftest.py): (run folder, its metrics, the demo data folder)."""
    _, out, metrics = demo_run
    (data,) = (cache_dir / "demo").glob("v1-train1000-test200-*")
    return out, metrics, data


def run_tool(tool, capsys, *args: str) -> tuple[int, str, str]:
    """Run a clipqa CLI function in-process: (exit status, stdout, stderr)."""
    try:
        tool(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clipqa_eval_reproduces_the_runs_test_and_validation_accuracy_exactly(trained, tmp_path, capsys):
    out, metrics, _ = trained
    code, stdout, _ = run_tool(cli.evaluate, capsys, str(out), "--out", str(tmp_path / "test"))
    assert code == 0
    again = json.loads((tmp_path / "test" / "metrics.json").read_text())
    for key in ("test/acc", "test/acc/object", "test/acc/number", "test/acc/color", "test/acc/location"):
        assert again[key] == metrics[key], key  # exactly: the same weights, features and batches
    assert again["test/prior_acc"] == metrics["test/prior_acc"] and again["data/n_test_evaluated"] == 200
    assert again["test/wups_0.9"] == metrics["test/wups_0.9"] and again["test/wups_0.0"] == metrics["test/wups_0.0"]
    assert (tmp_path / "test" / "test_predictions.tsv").read_text() == (out / "test_predictions.tsv").read_text()
    assert f"test/acc                     {metrics['test/acc']:.4f}" in stdout
    # val/acc of a run is the validation accuracy of the weights it kept
    run_tool(cli.evaluate, capsys, str(out / "best.pt"), "--split", "val", "--out", str(tmp_path / "val"))
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["val/acc"] == metrics["val/acc"]


def test_clipqa_eval_scores_another_cocoqa_folder(trained, tmp_path, capsys):
    out, _, data = trained
    other = tmp_path / "other"
    shutil.copytree(data, other)
    answers = other / "test" / "answers.txt"
    answers.write_text("\n".join("wrong" for _ in answers.read_text().splitlines()) + "\n")  # every answer wrong
    code, _, err = run_tool(
        cli.evaluate, capsys, str(out), "--data-root", str(other), "--image-root", str(other / "images"),
        "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["test/acc"] == 0.0


def test_clipqa_predict_answers_questions_about_a_picture(trained, capsys, tmp_path):
    out, metrics, data = trained
    # A location question the run answered right (its predictions file): predict must give that answer from the
    # picture file and the question text alone.
    rows = [line.split("\t") for line in (out / "test_predictions.tsv").read_text().splitlines()[1:]]
    image_id, question, truth = next((i, q, a) for i, t, q, a, p, ok in rows if t == "location" and ok == "1")
    image = data / "images" / "val2014" / f"COCO_val2014_{int(image_id):012d}.jpg"
    code, stdout, _ = run_tool(
        cli.predict, capsys, str(out), "--image", str(image), "--question", question, "--top-k", "3", "--json"
    )
    assert code == 0
    (result,) = [json.loads(line) for line in stdout.splitlines()]
    probs = [a["probability"] for a in result["answers"]]
    assert result["answers"][0]["answer"] == truth and len(probs) == 3
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # several questions from a file, printed for people
    (tmp_path / "q.tsv").write_text(f"{image}\t{question}\n{image}\twhat color is it\n")
    code, stdout, _ = run_tool(cli.predict, capsys, str(out), "--questions", str(tmp_path / "q.tsv"), "--top-k", "1")
    assert code == 0 and stdout.count(f"{image}: ") == 2 and f"%  {truth}" in stdout


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing checkpoint", ["no/such/run", "--image", "IMAGE", "--question", "what is it"], "No checkpoint at"),
        ("missing image", ["RUN", "--image", "no/such.jpg", "--question", "what is it"], "Image not found"),
        ("not an image", ["RUN", "--image", "RUN/metrics.json", "--question", "what is it"], "as a picture"),
        ("empty question", ["RUN", "--image", "IMAGE", "--question", " ?? "], "has no words"),
        ("bad questions file", ["RUN", "--questions", "RUN/metrics.json"], "expected IMAGE<TAB>QUESTION"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_clipqa_predict_bad_input_is_one_clear_error(trained, capsys, case, args, message):
    out, _, data = trained
    image = next((data / "images" / "val2014").iterdir())
    args = [a.replace("RUN", str(out)).replace("IMAGE", str(image)) for a in args]
    code, _, err = run_tool(cli.predict, capsys, *args)
    assert code == 2 and f"clipqa-predict: error: {message}" in err or message in err.split("error: ")[-1], err
    assert code == 2 and "Traceback" not in err


def test_clipqa_eval_bad_input_is_one_clear_error(trained, capsys, tmp_path):
    out, _, _ = trained
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for args, message in (
        ([str(tmp_path / "broken.pt")], "is not a readable checkpoint"),
        ([str(tmp_path)], "holds no best.pt"),
        ([str(out), "--data-root", str(tmp_path)], "COCO-QA train split not found"),
        (["runs:/0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], "No MLflow store at"),
        (["runs:/0123456789abcdef", "--tracking-uri", mlflow_store(tmp_path, "real.db")], "Cannot fetch runs:/"),
    ):
        code, _, err = run_tool(cli.evaluate, capsys, *args)
        assert code == 2 and message in err, (args, err)


@pytest.mark.slow
def test_a_tracked_run_is_usable_through_mlflow_uris_and_as_an_mlflow_model(tmp_path, cache_dir, capsys):
    """runs:/<id> and models:/<name>/1 give clipqa-eval the run's exact test/acc; the logged pyfunc model answers
    as clipqa-predict does."""
    import mlflow
    import pandas as pd

    uri = mlflow_store(tmp_path)
    overrides = [*SMALL_DEMO, "tracking=mlflow", f"tracking.uri={uri}", "tracking.register_as=smoke-qa"]
    metrics = train(compose_cfg(overrides, cache_dir), tmp_path / "run")
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text().strip()
    for ref in (f"runs:/{run_id}", "models:/smoke-qa/1"):
        out = tmp_path / ref.replace(":/", "-").replace("/", "-")
        code, _, err = run_tool(cli.evaluate, capsys, ref, "--tracking-uri", uri, "--out", str(out))
        assert code == 0, err
        assert json.loads((out / "metrics.json").read_text())["test/acc"] == metrics["test/acc"], ref
    (data,) = (cache_dir / "demo").glob("v1-train1000-test200-*")
    image = sorted((data / "images" / "val2014").iterdir())[0]
    question = (data / "test" / "questions.txt").read_text().splitlines()[0]
    code, stdout, err = run_tool(
        cli.predict, capsys, f"runs:/{run_id}", "--tracking-uri", uri, "--image", str(image),
        "--question", question, "--top-k", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    (expected,) = json.loads(stdout)["answers"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    got = model.predict(pd.DataFrame({"image": [image.read_bytes()], "question": [question]}))
    assert got["answer"][0] == expected["answer"]
    assert got["probability"][0] == pytest.approx(expected["probability"], rel=1e-5)
