"""The report's row names: what the user chose on the command line (the swept Hydra overrides of each job, tag
``clipqa.overrides``), the paper's V1..V4, and the raw config difference only for runs started without overrides."""

import json

from mlflow.tracking import MlflowClient

from clipqa.report.comparison import make_report
from tests.helpers.runs import mlflow_store
from tests.report.test_comparison import fake_run, main_table

# What a freeze sweep's jobs log as params: the raw difference the report once named its rows by.
TEXT = {"freeze.vision": "True", "freeze.text": "True", "freeze.mapper": "False", "trainer.phases": "None"}
STAGED = {**TEXT, "trainer.phases": json.dumps([{"name": "frozen_text", "epochs": 1}, {"name": "unfrozen_text"}])}


def report_rows(uri: str, out, parent: str | None = None) -> list[str]:
    md = make_report(uri, out, experiment="e", parent_run_id=parent).read_text()
    return [row[0] for row in main_table(md)]


def test_a_freeze_sweep_is_reported_by_its_swept_overrides(tmp_path):
    """``python train.py -m sweep=freeze experiment=demo`` with two seeds: rows freeze=staged and freeze=text, not
    ``freeze.text=True,...,trainer.phases=[...]``; the override shared by every job and the seed are not shown."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, run_name="sweep: experiment=demo", tags={"clipqa.sweep": "true"}).info.run_id
    for job, (freeze, params, seed, acc) in enumerate(
        [("text", TEXT, 1, 0.40), ("staged", STAGED, 1, 0.50), ("text", TEXT, 2, 0.42), ("staged", STAGED, 2, 0.52)]
    ):
        overrides = f"experiment=demo freeze={freeze} trainer.seed={seed} tracking.uri={uri}"
        tags = {"clipqa.overrides": overrides, "hydra.job.num": str(job)}
        fake_run(
            c, exp, f"freeze={freeze},trainer.seed={seed}", {**params, "trainer.seed": seed}, acc, parent, tags=tags
        )
    assert report_rows(uri, tmp_path / "rep", parent) == ["`freeze=staged`", "`freeze=text`"]
    csv_head = (tmp_path / "rep" / "report.csv").read_text().splitlines()[1]
    assert csv_head.startswith("freeze=staged,2,")


def test_several_swept_overrides_keep_their_command_line_order(tmp_path):
    """An optimizer sweep: the group override and its key override, as Hydra wrote them; a list value with a space
    in it stays one override."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for opt, lr, acc in [("adamw", "0.001", 0.5), ("adam", "0.0001", 0.4)]:
        tags = {"clipqa.overrides": f"optimizer={opt} optimizer.lr={lr} trainer.length_buckets=[16, 32]"}
        params = {"optimizer._target_": f"torch.optim.{opt.title()}", "optimizer.lr": lr}
        fake_run(c, exp, f"optimizer={opt},optimizer.lr={lr}", params, acc, tags=tags)
    assert report_rows(uri, tmp_path / "rep") == [
        "`optimizer=adam,optimizer.lr=0.0001`",
        "`optimizer=adamw,optimizer.lr=0.001`",
    ]


def test_runs_without_overrides_fall_back_to_the_config_difference(tmp_path):
    """A run trained by calling ``train(cfg)`` (no Hydra command line: tag ``(none)``, or no tag at all) is named by
    the config values that differ, beside the runs named by their overrides."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    fake_run(c, exp, "freeze=text", {"mapper.num_layers": "1", "freeze.text": "True"}, 0.4,
             tags={"clipqa.overrides": "freeze=text"})  # fmt: skip
    fake_run(c, exp, "freeze=none", {"mapper.num_layers": "1", "freeze.text": "False"}, 0.5,
             tags={"clipqa.overrides": "freeze=none"})  # fmt: skip
    fake_run(c, exp, "api", {"mapper.num_layers": "2", "freeze.text": "True"}, 0.6, tags={"clipqa.overrides": "(none)"})
    assert report_rows(uri, tmp_path / "rep") == [
        "`freeze.text=True,mapper.num_layers=2`",
        "`freeze=none`",
        "`freeze=text`",
    ]
    other = c.create_experiment(
        "plain", artifact_location=(tmp_path / "art").as_uri()
    )  # only runs without overrides: the raw difference, as before
    for layers in ("0", "3"):
        fake_run(c, other, "x", {"mapper.num_layers": layers}, 0.3)
    md = make_report(uri, tmp_path / "plain", experiment="plain").read_text()
    assert [row[0] for row in main_table(md)] == ["`mapper.num_layers=0`", "`mapper.num_layers=3`"]


def test_override_names_that_would_merge_different_configs_are_not_used(tmp_path):
    """Runs of two sweeps reported together, the YAML defaults changed in between: both have freeze=text but
    different mapper depths. Named by overrides they would share a row, so the rows are named by the config
    difference."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for layers, freeze, acc in [("1", "text", 0.4), ("1", "none", 0.5), ("2", "text", 0.6)]:
        params = {"mapper.num_layers": layers, "freeze.text": str(freeze == "text")}
        fake_run(c, exp, f"freeze={freeze}", params, acc, tags={"clipqa.overrides": f"freeze={freeze}"})
    assert report_rows(uri, tmp_path / "rep") == [
        "`freeze.text=False,mapper.num_layers=1`",
        "`freeze.text=True,mapper.num_layers=1`",
        "`freeze.text=True,mapper.num_layers=2`",
    ]
