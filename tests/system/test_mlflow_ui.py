"""The MLflow UI, for real: a demo multirun, `mlflow server` on 127.0.0.1, headless Chromium on the runs page.

Needs Debian's chromium (`.ci/run` installs it) and the `playwright` Python package (its own browser download is
not used: the system binary is launched). The screenshot is kept under tests/artifacts/ as a test artifact.
"""

from contextlib import contextmanager

import pytest

from tests.helpers.browser import ARTIFACTS, browser_page, check_accuracies_shown, runs_table_with_test_acc
from tests.helpers.mlflow_server import free_port, start_server, stop
from tests.helpers.runs import SMALL_DEMO, run_cli

pytestmark = pytest.mark.slow


@contextmanager
def ui_page(db: str, route: str, width: int, height: int):
    """An `mlflow server` on ``db`` (127.0.0.1, a free port) and a headless Chromium page open at ``route``."""
    port = free_port()
    server = start_server(db, port)
    try:
        with browser_page(f"http://127.0.0.1:{port}", route, width, height) as page:
            yield page
    finally:
        stop(server)


def test_runs_and_their_test_accuracy_are_visible_in_the_mlflow_ui(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'm.db'}"
    small = [*SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=600", "data.synthetic.n_test=100"]
    r = run_cli(
        "-m",
        *small,
        "trainer.max_steps=4",
        "mapper.num_layers=0,1",
        f"tracking.uri={db}",
        "tracking.experiment=ui",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("ui")
    children = [x for x in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in x.data.tags]
    accs = {x.info.run_name: x.data.metrics["test/acc"] for x in children}
    assert set(accs) == {"mapper.num_layers=0", "mapper.num_layers=1"}

    with ui_page(db, f"experiments/{exp.experiment_id}/runs", 2000, 900) as page:
        grid = runs_table_with_test_acc(page, accs, "mlflow_ui_runs.png")
    check_accuracies_shown(grid, accs)


def test_a_runs_logged_model_is_listed_in_the_mlflow_ui(tmp_path):
    """A single run logs its model (tracking.log_model, on for single runs): the run page lists it, registered."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'm.db'}"
    args = [*SMALL_DEMO, "tracking=mlflow", "trainer.max_steps=4", "tracking.register_as=ui-model"]
    r = run_cli(*args, f"tracking.uri={db}", "tracking.experiment=ui", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text().strip()
    exp_id = MlflowClient(db).get_run(run_id).info.experiment_id
    with ui_page(db, f"experiments/{exp_id}/runs/{run_id}", 1600, 1000) as page:
        section = page.get_by_text("Logged models (1)")
        section.wait_for(timeout=60_000)
        section.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "mlflow_ui_model.png"))
        body = page.inner_text("body")
    listed = body[body.index("Logged models (1)") :][:600]
    assert "\nmodel\nReady\n" in listed and "ui-model" in listed, listed
