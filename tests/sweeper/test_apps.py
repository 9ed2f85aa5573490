"""The Optuna sweeper as a Hydra user meets it: whole sweeps of small Hydra apps that are not clipqa's train.py
(tests/sweeper/apps/: a quadratic with a known optimum, a two-objective app, an app returning non-numbers).

Each app runs as ``python tests/sweeper/apps/APP.py -m hydra/sweeper=clipqa_optuna ...``, so Hydra finds the sweeper
through the ``hydra_plugins`` namespace package as it would for any user, and with ``import clipqa`` blocked in the
process and its jobs (tests/sweeper/no_clipqa/sitecustomize.py on PYTHONPATH): the plugin stands alone. The sweeps
start together once per module (they are small: a few seconds in all) and each test checks one promise of the
plugin's manual (docs/optuna-plugin.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.helpers.runs import ROOT

# Slow tier: eleven whole sweeps (subprocesses, ~15 s together on 2 cores). The fast tier keeps the plugin's parts
# (tests/sweeper/test_parts.py) and its import scan (tests/sweeper/test_standalone.py).
pytestmark = pytest.mark.slow

APPS = ROOT / "tests" / "sweeper" / "apps"
NO_CLIPQA = ROOT / "tests" / "sweeper" / "no_clipqa"  # its sitecustomize.py makes `import clipqa` fail
BLOCKED = "import of clipqa blocked"
SPACE = ["x=interval(-4, 4)", "y=int(interval(-3, 3))", "label=str(choice(1, 2))"]  # Hydra's casts: int, str
SAMPLERS = ("tpe", "random", "cmaes", "qmc")


def recorder(path: Path) -> str:
    """The override that registers tests/sweeper/apps/recording_hooks.py, writing its calls to ``path``."""
    return f"hydra.sweeper.hooks=[{{_target_:recording_hooks.Recorder,path:'{path}'}}]"


def runs(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (app, arguments): every sweep of this module."""
    minimize = "hydra.sweeper.direction=minimize"
    two = ["hydra.sweeper.direction=[minimize,minimize]", "hydra.sweeper.metric_names=[f1,f2]", "x=range(-2, 5)"]
    kinds = "kind=choice(number, none, str, dict, nan_value, list, raise, pruned)"
    return {
        # A full grid through the joblib launcher (2 jobs at a time), each job in its own folder named by its
        # overrides (chdir=true), the study in a *relative* sqlite file, n_trials far above the grid's 9 points.
        "grid": (
            "quadratic",
            [minimize, "hydra/sweeper/sampler=grid", "x=range(0, 5, 2)", "y=range(1, -4, -2)", "report=true",
             "hydra.sweeper.n_trials=100", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2", "hydra.job.chdir=true",
             "hydra.sweeper.storage=sqlite:///grid.db", "hydra.sweep.subdir=${hydra.job.override_dirname}",
             "hydra.sweeper.metric_names=[loss]"],
        ),
        **{
            s: ("quadratic", [minimize, f"hydra/sweeper/sampler={s}", *SPACE, "hydra.sweeper.n_trials=4"]
                + (["hydra.sweeper.custom_search_space=custom_space.add_side"] if s == "tpe" else [])
                + ([recorder(tmp / "hooks.jsonl")] if s == "random" else []))  # the hook interface
            for s in SAMPLERS
        },
        "front": ("two_objectives", [*two, "hydra/sweeper/sampler=grid"]),
        "nsgaii": (
            "two_objectives",
            [*two, "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.n_trials=6", f"hydra.sweeper.storage=sqlite:///{tmp}/n.db"],
        ),
        "returns": ("returns", [kinds, "hydra/sweeper/sampler=grid", f"hydra.sweeper.storage=sqlite:///{tmp}/r.db"]),
        "failure_rate": (
            "returns",
            ["kind=none", "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failure_rate=0.5",
             f"hydra.sweeper.storage=sqlite:///{tmp}/f.db", recorder(tmp / "failed.jsonl")],
        ),
        "direction": ("quadratic", [minimize, "x=interval(-4, 4)", f"hydra.sweeper.storage=sqlite:///{tmp}/d.db"]),
    }  # fmt: skip


class Sweep:
    def __init__(self, tmp: Path, name: str, proc: subprocess.Popen):
        self.dir, self.proc = tmp / name, proc
        self.output = proc.communicate(timeout=180)[0]
        self.returncode = proc.returncode

    @property
    def results(self) -> dict:
        return yaml.safe_load((self.dir / "optimization_results.yaml").read_text())

    def received(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*/received.json"))]

    def ok(self) -> str:
        """The output, for assertion messages; asserts the sweep succeeded."""
        assert self.returncode == 0, self.output[-3000:]
        return self.output


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Sweep]:
    tmp = tmp_path_factory.mktemp("optuna-apps")
    optuna.create_study(study_name="quadratic", storage=f"sqlite:///{tmp}/d.db", direction="maximize")
    pythonpath = os.pathsep.join(p for p in (str(NO_CLIPQA), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": pythonpath}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(APPS / f"{app}.py"),
                "-m",
                "hydra/sweeper=clipqa_optuna",
                f"hydra.sweep.dir={tmp / name}",
                *args,
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, (app, args) in runs(tmp).items()
    }
    return {name: Sweep(tmp, name, proc) for name, proc in procs.items()}


def test_clipqa_cannot_be_imported_where_the_apps_run():
    """The blocker works: the sweeps below ran without clipqa."""
    env = {**os.environ, "PYTHONPATH": str(NO_CLIPQA)}
    r = subprocess.run([sys.executable, "-c", "import clipqa"], env=env, capture_output=True, text=True, cwd=APPS)
    assert r.returncode != 0 and BLOCKED in r.stderr, r.stderr


@pytest.mark.parametrize(
    "sampler, sweep",
    [("tpe", "tpe"), ("random", "random"), ("grid", "grid"), ("cmaes", "cmaes"), ("qmc", "qmc"), ("nsgaii", "nsgaii")],
)
def test_every_sampler_sweeps_an_app_without_clipqa(sweeps, sampler, sweep):
    """Bug caught: a module of the plugin (or the job-side trial API) importing clipqa, found only by a user
    without it; an attempt caught and ignored shows too (the blocker writes every attempt to stderr)."""
    s = sweeps[sweep]
    out = s.ok()
    assert BLOCKED not in out
    cls = dict(tpe="TPE", random="Random", grid="Grid", cmaes="CmaEs", qmc="QMC", nsgaii="NSGAII")[sampler]
    assert f"sampler {cls}Sampler" in out
    results = s.results
    assert results["trials"]["complete"] == len(s.received()) or sampler == "nsgaii"
    assert results["trials"]["complete"] >= 4
    assert ("best_value" in results) if sampler != "nsgaii" else len(results["solutions"]) >= 1


def test_every_sweep_ran_without_clipqa(sweeps):
    for name, s in sweeps.items():
        assert BLOCKED not in s.output, name


def test_hooks_are_called_in_order_with_the_study_and_its_results(sweeps):
    """The hook interface (hooks.py): defaults, on_study_start, on_trial_end per trial, on_sweep_end."""
    s = sweeps["random"]
    s.ok()
    events = [json.loads(line) for line in (s.dir.parent / "hooks.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["defaults", "on_study_start", *["on_trial_end"] * 4, "on_sweep_end"]
    assert events[0]["directions"] == ["minimize"]
    assert events[1] == {"event": "on_study_start", "name": "quadratic", "storage": "memory", "n": 0}
    assert all(e["state"] == "COMPLETE" and e["reason"] is None for e in events[2:6])
    assert [e["number"] for e in events[2:6]] == [0, 1, 2, 3]
    assert events[6] == {
        "event": "on_sweep_end", "best": s.results["best_trial"], "launched": 4, "files": ["optimization_results.yaml"]
    }  # fmt: skip


def test_a_failing_sweep_calls_on_sweep_failed_with_the_message_after_on_sweep_end(sweeps):
    s = sweeps["failure_rate"]
    assert s.returncode != 0
    events = [json.loads(line) for line in (s.dir.parent / "failed.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["defaults", "on_study_start", "on_trial_end", "on_sweep_end",
                                            "on_sweep_failed"]  # fmt: skip
    assert events[2]["state"] == "FAIL" and events[2]["reason"] == "returned None (NoneType), not a number"
    assert events[3]["best"] is None
    assert "1 of the 1 trials launched failed, more than hydra.sweeper.max_failure_rate=0.5" in events[4]["error"]


def study(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_any_app_runs_with_every_sampler_and_gets_hydras_values(sweeps, sampler):
    """No clipqa keys in the app; int(...) and str(...) casts honoured; in memory when no storage is given."""
    s = sweeps[sampler]
    out = s.ok()
    assert f"sampler {dict(tpe='TPE', random='Random', cmaes='CmaEs', qmc='QMC')[sampler]}Sampler" in out
    assert "in memory (hydra.sweeper.storage=null)" in out
    received = s.received()
    assert len(received) == 4
    for r in received:
        v, t = r["values"], r["types"]
        assert t["x"] == "float" and -4 <= v["x"] <= 4, r
        assert t["y"] == "int" and -3 <= v["y"] <= 3, r  # int(interval(-3, 3)): integers
        assert v["label"] in ("1", "2") and t["label"] == "str", r  # str(choice(1, 2)): strings
        if sampler == "tpe":  # custom_search_space: side searched where y < 0 only
            assert (v["side"] in ("low", "high")) if v["y"] < 0 else v["side"] == "none", r
    best = s.results
    assert set(best["best_params"]) >= {"x", "y", "label"} and best["best_value"] == min(
        (r["values"]["x"] - 2) ** 2 + (r["values"]["y"] + 1) ** 2 for r in received
    )


def test_a_full_grid_ends_cleanly_with_joblib_chdir_and_a_relative_sqlite_url(sweeps):
    s = sweeps["grid"]
    out = s.ok()
    assert "grid of 9 points: n_trials 100 -> 9" in out
    url = f"sqlite:///{s.dir.parent / 'grid.db'}"  # relative to where the sweep started, not to each job's folder
    st = study(url, "quadratic")
    assert [t.state for t in st.trials] == [TrialState.COMPLETE] * 9
    # Hydra's range: stop excluded, negative steps; every point once
    points = sorted((t.params["x"], t.params["y"]) for t in st.trials)
    assert points == sorted((x, y) for x in (0, 2, 4) for y in (1, -1, -3))
    # each job opened the study from its own folder (chdir) and reported to its trial
    assert all(t.intermediate_values == {0: t.value} for t in st.trials)
    assert not list(s.dir.rglob("grid.db"))
    assert st.metric_names == ["loss"]
    assert s.results["best_params"] == {"x": 2, "y": -1} and s.results["best_value"] == 0.0
    assert s.results["best_trial"] == st.best_trial.number and s.results["trials"] == {"complete": 9}


def test_override_dirname_and_overrides_yaml_hold_only_the_users_overrides(sweeps):
    s = sweeps["grid"]
    s.ok()
    folders = sorted(p.name for p in s.dir.iterdir() if p.is_dir())
    assert folders == sorted(f"report=true,x={x},y={y}" for x in (0, 2, 4) for y in (1, -1, -3))
    for folder in folders:
        overrides = yaml.safe_load((s.dir / folder / ".hydra" / "overrides.yaml").read_text())
        assert sorted(overrides) == sorted(folder.split(","))
        received = json.loads((s.dir / folder / "received.json").read_text())
        assert received["cwd"] == str(s.dir / folder)  # hydra.job.chdir=true


def test_non_numeric_returns_are_failed_trials_with_the_reason_and_the_sweep_goes_on(sweeps):
    s = sweeps["returns"]
    out = s.ok()  # not every trial failed
    st = study(f"sqlite:///{s.dir.parent / 'r.db'}", "returns")
    by_kind = {t.params["kind"]: t for t in st.trials}
    assert len(by_kind) == 8 and TrialState.RUNNING not in {t.state for t in st.trials}
    assert by_kind["number"].state == TrialState.COMPLETE and by_kind["number"].value == 1.5
    assert by_kind["pruned"].state == TrialState.PRUNED
    reasons = {
        "none": "returned None (NoneType), not a number",
        "str": "returned '0.5' (str), not a number",
        "dict": "returned {'acc': 0.5} (dict), not a number",
        "list": "returned [1.0] (list), not a number",
        "nan_value": "returned nan",
        "raise": "ValueError: the job broke",
    }
    for kind, reason in reasons.items():
        assert by_kind[kind].state == TrialState.FAIL and by_kind[kind].user_attrs["fail_reason"] == reason
        assert reason in out
    assert s.results["trials"] == {"complete": 1, "pruned": 1, "fail": 6}


def test_max_failure_rate_stops_the_sweep_with_one_message(sweeps):
    s = sweeps["failure_rate"]
    assert s.returncode != 0
    assert "1 of the 1 trials launched failed, more than hydra.sweeper.max_failure_rate=0.5" in s.output
    assert "Traceback" not in s.output
    st = study(f"sqlite:///{s.dir.parent / 'f.db'}", "returns")
    assert [t.state for t in st.trials] == [TrialState.FAIL]
    assert s.results["trials"] == {"fail": 1}  # written before stopping


def test_a_direction_mismatch_is_a_clear_error(sweeps):
    s = sweeps["direction"]
    url = f"sqlite:///{s.dir.parent / 'd.db'}"
    assert s.returncode != 0 and "Traceback" not in s.output
    assert (
        f"hydra.sweeper.direction=minimize does not match the study 'quadratic' in {url}, which was created with "
        "direction maximize" in s.output
    )
    assert "another hydra.sweeper.study_name" in s.output
    assert study(url, "quadratic").trials == []


def test_two_objectives_give_the_pareto_front(sweeps):
    s = sweeps["front"]
    out = s.ok()
    assert "pruning is off: Optuna cannot prune a multi-objective study" in out
    solutions = s.results["solutions"]
    assert sorted(sol["params"]["x"] for sol in solutions) == [0, 1, 2]  # x^2 and (x-2)^2: 0 <= x <= 2
    assert all(sol["metrics"] == {"f1": sol["values"][0], "f2": sol["values"][1]} for sol in solutions)
    assert (s.dir / "pareto_front.png").stat().st_size > 1000
    assert s.results["metric_names"] == ["f1", "f2"] and s.results["trials"] == {"complete": 7}

    n = sweeps["nsgaii"]
    n.ok()
    assert "sampler NSGAIISampler" in n.output
    front = [tuple(sol["values"]) for sol in n.results["solutions"]]
    # the solutions are exactly the trials no other trial dominates
    trials = study(f"sqlite:///{n.dir.parent / 'n.db'}", "two_objectives").trials
    values = [tuple(t.values) for t in trials]
    dominated = [v for v in values if any(o[0] <= v[0] and o[1] <= v[1] and o != v for o in values)]
    assert len(values) == 6 and sorted(front) == sorted(v for v in values if v not in dominated)
