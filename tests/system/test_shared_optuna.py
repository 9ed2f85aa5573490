"""Several sweeper processes on one Optuna study (SQLite and a real PostgreSQL server): the study is created by
whichever starts first, the workers share ``n_trials`` exactly, a worker killed with SIGKILL leaves no trial RUNNING
(a surviving worker fails and retries its trials), pruning uses every worker's trials, and the storage's password
reaches no log or file.

Fast: the retry loop's give-up message, the ask lock, a waiting retry asked when the study is full. Slow: the creation
race between processes, stale trials failed and retried, whole sweeps of the toy app tests/sweeper/apps/steps.py (no
training), and one pair of real clipqa sweeps (experiment=smoke).
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.clipqa_optuna_sweeper._storage import make_storage, open_study, retry_race
from hydra_plugins.clipqa_optuna_sweeper._workers import Heartbeats, ask, fail_stale_trials, retry_history, trials_used
from hydra_plugins.clipqa_optuna_sweeper.errors import SweeperError
from tests.helpers.runs import ROOT, SMALL_DEMO

APP = ROOT / "tests" / "sweeper" / "apps" / "steps.py"
# The toy app's sweeps run with `import clipqa` blocked (tests/sweeper/no_clipqa/sitecustomize.py): several workers
# on one study is the plugin's own business.
NO_CLIPQA = {
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests/sweeper/no_clipqa"), os.environ.get("PYTHONPATH")]))
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --- fast: the pieces ------------------------------------------------------------------------------------------------
def _create_at_once(url: str, barrier, results) -> None:
    barrier.wait()  # every process leaves the barrier together: they create the tables and the study at once
    try:
        open_study(make_storage(url), "fresh", ["maximize"])
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def create_concurrently(url: str, n: int = 4) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_create_at_once, args=(url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [results.get(timeout=5) for _ in procs]


@pytest.mark.slow  # 4 processes: ~5-8 s
def test_processes_creating_one_new_sqlite_study_at_once_all_get_it(tmp_path):
    """The bug: optuna.create_study(load_if_exists=True) from processes starting together on a fresh SQLite file fails
    in all but one ("table ... already exists", "database is locked"), hence the README's old "create it first"."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert create_concurrently(url) == ["ok"] * 4
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["fresh"]


def test_a_creation_race_that_never_ends_gives_one_clear_error_and_other_errors_pass_at_once():
    from sqlalchemy.exc import OperationalError

    calls = []

    def locked():
        calls.append(1)
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    with pytest.raises(
        SweeperError, match=r"Creating the study 'x': still failing after 3 attempts.*database is locked"
    ):
        retry_race(locked, "Creating the study 'x'", attempts=3, pause=0)
    assert len(calls) == 3

    def refused():
        calls.append(1)
        raise OperationalError("connect", {}, Exception('connection to server at "127.0.0.1" failed'))

    calls.clear()
    with pytest.raises(OperationalError):  # not a race: no retry loop in front of a server that is down
        retry_race(refused, "Creating the study 'x'", attempts=3, pause=0)
    assert len(calls) == 1


@pytest.mark.slow  # waits out two grace periods
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_sweeper_stopped_beating_fails_and_is_retried_once_without_using_the_budget(tmp_path):
    """What a surviving worker does with a dead one's trial: FAIL after grace_period without heartbeats, a WAITING
    copy with the same parameters (once: max_retry=1), and n_trials still counts the pair as one trial."""
    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1, max_retry=1)
    study = open_study(storage, "s", ["minimize"])
    with Heartbeats(storage) as beats:
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        beats.add(trial._trial_id)
        beats.discard(trial._trial_id)  # its sweeper "dies": no more heartbeats
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a live trial, beating
    with Heartbeats(storage) as beats:
        beats.add(alive._trial_id)
        time.sleep(2.1)  # > grace_period since the dead trial's last beat; the live one beats every second
        fail_stale_trials(study)
        fail_stale_trials(study)  # a second worker checking too retries nothing more
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.RUNNING, 2: TrialState.WAITING}, states
    retry = study.trials[2]
    assert retry.params == study.trials[0].params and retry_history(retry) == [0]
    assert trials_used(study.trials) == 2  # trial 0 and its retry count once

    study.tell(alive, 0.5)
    again = study.ask()  # the retry is asked first; it dies too: FAIL, and no third try (max_retry=1)
    assert again.number == 2 and again.params == study.trials[0].params
    with Heartbeats(storage) as beats:
        beats.add(again._trial_id)
        beats.discard(again._trial_id)
    time.sleep(2.1)
    fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert trials_used(study.trials) == 2


SPACE = {"x": optuna.distributions.FloatDistribution(0, 1)}  # what the sweeper asks with: a search space


def _ask_until_full(url: str, n_trials: int, barrier, results) -> None:
    storage = make_storage(url, heartbeat_interval=5)
    study = open_study(storage, "s", ["minimize"])
    barrier.wait()
    asked = 0
    with Heartbeats(storage) as beats:
        while (trial := ask(study, storage, url, SPACE, n_trials, False, beats)) is not None:
            study.tell(trial, trial.params["x"])
            beats.discard(trial._trial_id)
            asked += 1
    results.put(asked)


def test_workers_asking_as_fast_as_they_can_never_pass_n_trials(tmp_path):
    """The count and the ask happen under the study's lock: three workers racing for the last places of one study
    end with exactly n_trials trials. Bug caught: counting, then asking, without the lock (a trial or more too
    many), or each worker counting its own trials (3 x n_trials)."""
    url = f"sqlite:///{tmp_path / 'fast.db'}"
    open_study(make_storage(url), "s", ["minimize"])
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_ask_until_full, args=(url, 12, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    asked = [results.get(timeout=5) for _ in procs]
    assert sum(asked) == 12 and all(asked), asked  # shared: every worker got some
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 12


@pytest.mark.slow
def test_a_waiting_retry_is_run_even_when_the_study_is_full(tmp_path):
    """A dead worker's retried trial (WAITING) is asked although the study holds n_trials: it replaces the failed
    one. Bug caught: a worker stopping at n_trials with the retry never run (left WAITING)."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    storage = make_storage(url, heartbeat_interval=1, grace_period=1, max_retry=1)
    study = open_study(storage, "s", ["minimize"])
    with Heartbeats(storage) as beats:
        first = ask(study, storage, url, SPACE, 2, False, beats)
        beats.discard(first._trial_id)  # its worker "dies"
        second = ask(study, storage, url, SPACE, 2, False, beats)
        study.tell(second, 0.5)
        beats.discard(second._trial_id)
        time.sleep(2.1)
        retry = ask(study, storage, url, SPACE, 2, False, beats)  # fails the stale trial, asks its retry
        assert retry is not None and retry.params == study.trials[first.number].params
        study.tell(retry, 0.1)
        assert ask(study, storage, url, SPACE, 2, False, beats) is None  # full: 2 trials, the failed one replaced
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


# --- slow: whole sweeps ----------------------------------------------------------------------------------------------
def worker(tmp: Path, name: str, storage: str, study: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """One sweeper process of the toy app (heartbeats every second, a dead worker's trials failed after 2 s)."""
    return subprocess.Popen(
        [sys.executable, str(APP), "-m", "hydra/sweeper=clipqa_optuna", "hydra.sweeper.direction=minimize",
         f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}", f"hydra.sweep.dir={tmp / name}",
         "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2", *args],
        cwd=tmp, env={**os.environ, "HYDRA_FULL_ERROR": "0", **NO_CLIPQA, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def started(sweep_dir: Path) -> dict[int, dict]:
    """trial number -> what the app wrote when it started (in that worker's sweep folder)."""
    found = {}
    for f in sweep_dir.glob("*/started.json"):
        info = json.loads(f.read_text())
        found[info["trial"]] = info
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def files_holding(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture(params=["postgresql", "sqlite"])
def shared_storage(request, tmp_path) -> tuple[str, str, dict, dict]:
    """(URL the workers connect to, URL as tests open it, environment of worker A, of worker B) of a new database.

    PostgreSQL: worker A reads the URL with its password from an environment variable (``${oc.env:...}``), worker
    B gets the URL without it and PGPASSWORD, as the README advises; both are the same storage."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        return url, url, {}, {}
    pg = request.getfixturevalue("postgres")
    url = pg.create_database(f"shared_{os.getpid()}_{time.monotonic_ns()}")
    without_password = url.replace(f":{pg.password}@", "@")
    return (
        "${oc.env:OPTUNA_STORAGE}",
        url,
        {"OPTUNA_STORAGE": url},
        {"OPTUNA_STORAGE": without_password, "PGPASSWORD": pg.password},
    )


@pytest.mark.slow
def test_two_workers_start_together_on_a_new_study_share_n_trials_and_survive_a_sigkill(tmp_path, shared_storage):
    """Two sweeps started at once on a study nobody created: both open it; one is SIGKILLed while a trial of it runs;
    the other fails that worker's trials once they miss their heartbeats, retries them and finishes the study with
    exactly n_trials trials (a retried trial counting once) and none RUNNING or WAITING.

    Bugs caught: the creation race; both workers running n_trials each (or a batch too many); a killed worker's
    trials stuck RUNNING forever; the survivor ending before the dead worker's trials came back."""
    arg, url, env_a, env_b = shared_storage
    n_trials = 8
    common = ["x=interval(0, 1)", f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=2",
              "steps=4", "step_seconds=0.25", "hydra.sweeper.pruner.name=none"]  # fmt: skip
    a = worker(tmp_path, "a", arg, "race", *common, env=env_a)
    b = worker(tmp_path, "b", arg, "race", *common, env=env_b)
    # Near the end: a runs the first job of its second batch (the second asked, waiting for it): the study has its
    # n_trials, so b must wait for a's trials to miss their heartbeats, then retry them.
    wait_for(lambda: len(started(tmp_path / "a")) >= 3 or a.poll() is not None, 120, "worker a's third trial")
    os.kill(a.pid, signal.SIGKILL)
    a_out = a.communicate(timeout=30)[0]
    b_out = b.communicate(timeout=180)[0]
    assert b.returncode == 0, b_out[-3000:]

    study = optuna.load_study(study_name="race", storage=url)
    trials = study.trials
    assert all(t.state in FINISHED for t in trials), [(t.number, t.state) for t in trials]
    assert trials_used(trials) == n_trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's running trial should have failed"
    in_a = set(started(tmp_path / "a"))
    for dead in failed:  # a's trials (its running job, and the batch mate it had asked for), each retried in b
        (retry,) = [t for t in trials if retry_history(t) == [dead.number]]
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params
        assert retry.number in started(tmp_path / "b")
    assert {t.number for t in failed} >= in_a - {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert "no heartbeat from the sweeper that ran it" in b_out
    if "OPTUNA_STORAGE" in env_a:  # the password: in no log line and in no file the sweeps left
        password = env_b["PGPASSWORD"]
        assert password not in a_out + b_out
        assert files_holding(tmp_path, password) == []
        assert f"in {env_b['OPTUNA_STORAGE']}:" in b_out  # the storage is named, without its password


@pytest.mark.slow
def test_pruning_judges_one_workers_trials_by_the_other_workers_results(tmp_path, postgres):
    """Worker b's trials (x=0.9) wait until worker a (x=0.1) has finished the median pruner's two start-up trials,
    then report: each is pruned at its first report, on a's values alone. Bug caught: a job judged only against its
    own sweeper's trials (e.g. an in-memory copy of the study) would run to the end."""
    url = postgres.create_database(f"prune_{os.getpid()}_{time.monotonic_ns()}")
    common = [f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner.n_startup_trials=2",
              "hydra.sweeper.pruner.name=median", "steps=3", "step_seconds=0.1"]  # fmt: skip
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **NO_CLIPQA}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(APP),
                "-m",
                "hydra/sweeper=clipqa_optuna",
                "hydra.sweeper.direction=minimize",
                "hydra.sweeper.study_name=prune",
                f"hydra.sweep.dir={tmp_path / name}",
                *common,
                *extra,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, extra in {"a": ["x=0.1"], "b": ["x=0.9", "wait_for_complete=2"]}.items()
    }
    outs = {name: p.communicate(timeout=180)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {n: o[-2000:] for n, o in outs.items()}
    assert url.split("@")[0] not in "".join(outs.values())  # the password never shows
    study = optuna.load_study(study_name="prune", storage=url)
    by_worker = {name: set(started(tmp_path / name)) for name in procs}
    assert by_worker["b"], "worker b should have run at least one trial"
    assert by_worker["a"] | by_worker["b"] == {t.number for t in study.trials} and len(study.trials) == 6
    for t in study.trials:
        if t.number in by_worker["b"]:
            assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [0], (t.number, t.state)
        else:
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(0.1)


@pytest.mark.slow
def test_two_clipqa_sweeps_on_one_new_postgres_study_report_the_whole_study(tmp_path, postgres):
    """The real path: two `train.py -m sweep=optuna` processes on one new PostgreSQL study, one MLflow parent
    run per worker; the later worker's report lists every trial of the study, and the password reaches no file,
    MLflow tag or param, nor the output."""
    from mlflow.tracking import MlflowClient

    url = postgres.create_database(f"clipqa_{os.getpid()}_{time.monotonic_ns()}")
    mlflow_uri = f"sqlite:///{tmp_path / 'm.db'}"
    # MLflow's own SQLite schema set-up is not safe for two processes at once ("Online migration expected to match
    # one row"; a team uses an MLflow server): the tracking database exists before the workers start.
    MlflowClient(mlflow_uri).search_experiments()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0", "OPTUNA_STORAGE": url}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "-m",
                "sweep=optuna",
                *SMALL_DEMO,
                "tracking=mlflow",
                "data.synthetic.n_train=300",
                "data.synthetic.n_test=60",
                "trainer.max_steps=6",
                "trainer.eval_every=3",
                f"tracking.uri={mlflow_uri}",
                "hydra.sweeper.n_trials=2",
                "hydra.sweeper.pruner.name=none",
                "hydra.sweeper.storage=${oc.env:OPTUNA_STORAGE}",
                "hydra.sweeper.study_name=team",
                f"hydra.sweep.dir={tmp_path / f'w{i}'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    context = "\n=====\n".join(o[-3000:] for o in outs)  # both workers' output, for any failure below
    assert all(p.returncode == 0 for p in procs), context
    study = optuna.load_study(study_name="team", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, context

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("clipqa").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if r.data.tags.get("clipqa.sweep") == "true"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents), context
    assert {p.data.tags["clipqa.optuna_study"] for p in parents} == {"team"}
    trial_runs = {r.data.tags["optuna.trial"] for r in runs if "optuna.trial" in r.data.tags}
    assert trial_runs == {"0", "1"}, context
    last = max(parents, key=lambda p: p.info.end_time)
    report = (Path(last.data.tags["hydra.sweep.dir"]) / "report" / "report.csv").read_text()
    assert all(r.info.run_id in report for r in runs if "optuna.trial" in r.data.tags), report + context
    password = url.split(":")[2].split("@")[0]
    assert password not in "".join(outs)
    assert files_holding(tmp_path, password) == []  # sweep folders, job configs, the MLflow database
