"""clipqa's side of the Optuna sweeper: a two-objective search with train.py, and the sweeper picked without the named
sweep (slow: every trial trains).

The single-objective study (pruning, resume, the best trial in MLflow, failures) is in
tests/sweep/test_named_sweeps.py; the sweeper on apps that are not clipqa's is in tests/sweeper/test_apps.py. clipqa's
extras reach the sweeper through its hooks (clipqa/sweep/optuna_hooks.py, registered by conf/sweep/optuna*.yaml).
"""

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers.runs import SMALL_DEMO, run_cli


@pytest.mark.slow
def test_two_objective_search_returns_the_named_metrics_and_tags_its_pareto_front(tmp_path):
    uri, storage = f"sqlite:///{tmp_path / 'm.db'}", f"sqlite:///{tmp_path / 'o.db'}"
    r = run_cli(
        *("-m", "sweep=optuna_tradeoff", *SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=300"),
        *("data.synthetic.n_test=60", "trainer.max_steps=6", "trainer.eval_every=3", f"tracking.uri={uri}"),
        *("hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'sweep'}"),
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "pruning is off: Optuna cannot prune a multi-objective study" in r.stdout + r.stderr
    study = optuna.load_study(study_name="clipqa-tradeoff", storage=storage)
    assert study.metric_names == ["val/acc", "params/trainable"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    front = {s["trial"]: s["metrics"] for s in results["solutions"]}
    assert front and set(front) == {t.number for t in study.best_trials}
    assert (tmp_path / "sweep" / "pareto_front.png").is_file()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("clipqa").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["clipqa.jobs"] == "3 jobs: 3 finished, 0 pruned, 0 failed"
    tagged = {int(x.data.tags["optuna.trial"]): x for x in runs if x.data.tags.get("clipqa.pareto_front") == "true"}
    assert set(tagged) == set(front)
    for number, run in tagged.items():  # what train.py returned is what the run logged
        assert front[number] == {
            "val/acc": pytest.approx(run.data.metrics["val/acc"]),
            "params/trainable": run.data.metrics["params/trainable"],
        }
    assert all(f"trial {n}: val/acc" in parent.data.tags["clipqa.pareto_front"] for n in front)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert artifacts == {"optuna/optimization_results.yaml", "optuna/pareto_front.png"}


@pytest.mark.slow
def test_the_sweeper_picked_without_the_named_sweep_runs_and_still_closes_the_mlflow_parent(tmp_path):
    """`hydra/sweeper=clipqa_optuna` without `sweep=optuna`: no clipqa hooks, so the sweep runs as for any app (an
    in-memory study), clipqa's Hydra callback warns that the hooks are missing and still ends the parent run
    FINISHED with its job counts (docs/optuna-plugin.md, "How clipqa registers its hooks")."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_cli(
        *("-m", "hydra/sweeper=clipqa_optuna", *SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=300"),
        *("data.synthetic.n_test=60", "trainer.max_steps=3", "trainer.eval_every=3", f"tracking.uri={uri}"),
        *("hydra.sweeper.n_trials=2", "optimizer.lr=tag(log, interval(1e-5, 1e-3))", f"hydra.sweep.dir={tmp_path}/s"),
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "without clipqa's hooks" in out and "in memory (hydra.sweeper.storage=null)" in out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clipqa").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`clipqa.sweep` = 'true'")
    assert parent.info.status == "FINISHED", parent.data.tags
    assert parent.data.tags["clipqa.jobs"] == "2 jobs: 2 finished, 0 pruned, 0 failed"
    assert "clipqa.optuna_study" not in parent.data.tags  # the hooks' tag: not registered here
