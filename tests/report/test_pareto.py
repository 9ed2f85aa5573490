"""A multi-objective Optuna study's report lists its Pareto front with the study's objectives."""

import yaml
from mlflow.tracking import MlflowClient

from clipqa.report.comparison import make_report
from tests.helpers.runs import mlflow_store


def test_the_report_of_a_two_objective_study_lists_its_pareto_front(tmp_path):
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("front", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"clipqa.sweep": "true"}).info.run_id
    (tmp_path / "optimization_results.yaml").write_text(
        yaml.safe_dump({"metric_names": ["val/acc", "params/trainable"], "directions": ["maximize", "minimize"]})
    )
    client.log_artifact(parent, str(tmp_path / "optimization_results.yaml"), "optuna")
    trials = {"trial 0": (0.30, 5000, True), "trial 1": (0.60, 90000, True), "trial 2": (0.20, 80000, False)}
    for name, (acc, params, on_front) in trials.items():
        tags = {"mlflow.parentRunId": parent, "clipqa.pareto_front": "true" if on_front else "false"}
        run = client.create_run(exp, run_name=name, tags=tags).info.run_id
        for key, value in {"test/acc": acc, "val/acc": acc, "params/trainable": params, "data/n_test": 100}.items():
            client.log_metric(run, key, value)
        client.set_terminated(run)
    report = make_report(uri, tmp_path / "report", experiment_id=exp, parent_run_id=parent).read_text()
    section = report[report.index("## Pareto front (2 of 3 trials)") :]
    assert "val/acc (max)" in section and "params/trainable (min)" in section
    assert section.index("`trial 1`") < section.index("`trial 0`") and "`trial 2`" not in section
    assert "| `trial 1` | 0.6 | 9e+04 |" in section
