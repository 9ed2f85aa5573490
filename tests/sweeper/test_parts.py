"""The Optuna sweeper's pieces: search-space grammar, storages, samplers and pruners (fast, no training).

Whole sweeps of small Hydra apps (not train.py) are in tests/sweeper/test_apps.py.
"""

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from clipqa.sweep.optuna_trial import objective
from hydra_plugins.clipqa_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.clipqa_optuna_sweeper._results import objective_values
from hydra_plugins.clipqa_optuna_sweeper._space import distribution, encode, search_space
from hydra_plugins.clipqa_optuna_sweeper._storage import make_storage
from hydra_plugins.clipqa_optuna_sweeper.config import SAMPLERS, PrunerConf
from hydra_plugins.clipqa_optuna_sweeper.trial import TrialJob


def dist(line: str):
    (override,) = OverridesParser.create().parse_overrides([line])
    return distribution(override)


def test_search_space_grammar_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert dist("optimizer=choice(adam, adamw)") == CategoricalDistribution(["adam", "adamw"])
    assert dist("mapper.num_layers=range(0, 4)") == IntDistribution(0, 3)
    assert dist("optimizer.lr=tag(log, interval(1e-5, 1e-3))") == FloatDistribution(1e-5, 1e-3, log=True)
    assert dist("mapper.dropout=interval(0.0, 0.3)") == FloatDistribution(0.0, 0.3)
    assert dist("mapper.hidden_dim=tag(int, interval(64, 512))") == IntDistribution(64, 512)
    assert dist("mapper.num_layers=1,2") == CategoricalDistribution([1, 2])


@pytest.mark.parametrize(
    "expr, values",
    [
        ("range(0, 5, 2)", [0, 2, 4]),  # Hydra's range: stop excluded, the step kept
        ("range(5, 0, -1)", [1, 2, 3, 4, 5]),  # a negative step
        ("range(5, 0, -2)", [1, 3, 5]),
        ("range(3)", [0, 1, 2]),
        ("shuffle(range(0, 3))", [0, 1, 2]),
        ("range(0, 1, 0.25)", [0.0, 0.25, 0.5, 0.75]),  # float values: exactly Hydra's
        ("float(range(1, 3))", [1.0, 2.0]),  # Hydra's casts act on the values
        ("str(choice(1, 2))", ["1", "2"]),
        ("bool(choice(0, 1))", [False, True]),
    ],
)
def test_discrete_search_spaces_hold_exactly_hydras_values(expr, values):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"k={expr}"])
    d = dist(f"k={expr}")
    held = list(d.choices) if hasattr(d, "choices") else list(range(d.low, d.high + 1, d.step))
    assert sorted(held) == sorted(override.sweep_iterator()) == values
    assert [type(v) for v in sorted(held)] == [type(v) for v in values]


def test_casts_on_intervals_and_bad_entries():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert dist("k=int(interval(1, 5))") == IntDistribution(1, 5)  # Hydra's int(...) cast: integers
    assert dist("k=tag(log, int(interval(1, 100)))") == IntDistribution(1, 100, log=True)
    assert dist("k=float(interval(1, 2))") == FloatDistribution(1.0, 2.0)
    assert dist("k=choice([1,2], {a: 1}, b)") == CategoricalDistribution(["[1,2]", "{a:1}", "b"])  # override text
    with pytest.raises(Exception, match=r"hydra.sweeper.params.k: range\(5, 0\) holds no values"):
        dist("k=range(5, 0)")


@pytest.mark.parametrize(
    "value, text",
    [("adam", "adam"), ("1", "'1'"), ("true", "'true'"), ("it's", "'it\\'s'"), ("a b", "a b"), ("1e-5", "'1e-5'"),
     (1e-05, "1e-05"), (3, "3"), (True, "true"), (None, "null"), ([1, "a"], "[1,a]"), ("x,y", "'x,y'")],
)  # fmt: skip
def test_values_reach_the_job_as_the_same_values(value, text):
    assert encode(value) == text
    (override,) = OverridesParser.create().parse_overrides([f"k={text}"])
    assert override.value() == value and type(override.value()) is type(value)


def test_return_values_that_are_not_numbers_are_named():
    import numpy as np

    assert objective_values(0.5, 1) == ([0.5], None) and objective_values(np.float32(2), 1) == ([2.0], None)
    assert objective_values(3, 1) == ([3.0], None) and objective_values((1, 2.5), 2) == ([1.0, 2.5], None)
    bad_values = [(None, "returned None (NoneType), not a number"), ("0.5", "returned '0.5' (str), not a number"),
                  ({"acc": 1}, "(dict), not a number"), (float("nan"), "returned nan"), (True, "(bool)")]  # fmt: skip
    for bad, why in bad_values:
        values, reason = objective_values(bad, 1)
        assert values is None and why in reason
    assert "2 values for 3 objectives" in objective_values([1, 2], 3)[1]
    assert "not a list of 2 numbers" in objective_values(0.5, 2)[1]


def test_the_trial_reaches_the_job_through_a_hydra_quoted_environment_value(monkeypatch):
    job = TrialJob(3, 7, "it's $HOME ${x}", "sqlite:////tmp/a b/o.db", {"name": "median"}, ["val/acc"])
    (override,) = OverridesParser.create().parse_overrides([f"++hydra.job.env_set.X='{job.to_env()}'"])
    text = override.value()
    assert "${" not in text and OmegaConf.create({"v": text}).v == text  # never an interpolation
    monkeypatch.setenv("CLIPQA_OPTUNA_TRIAL", text)
    assert TrialJob.from_env() == job
    monkeypatch.delenv("CLIPQA_OPTUNA_TRIAL")
    assert TrialJob.from_env() is None


def test_train_py_returns_val_acc_or_the_named_metrics():
    from clipqa.errors import ClipqaError
    from clipqa.sweep.optuna_trial import pruning_callback

    assert pruning_callback(None) is None
    assert pruning_callback(TrialJob(0, 1, "s", None, {"name": "median"}, ["val/acc", "params/trainable"])) is None

    metrics = {"val/acc": 0.75, "params/trainable": 1200, "test/acc": 0.7}
    assert objective(metrics, None) == 0.75
    job = TrialJob(0, 1, "s", None, None, ["val/acc", "params/trainable"])
    assert objective(metrics, job) == (0.75, 1200.0)
    job.metric_names = ["val/ac"]
    with pytest.raises(ClipqaError, match="hydra.sweeper.metric_names names \\['val/ac'\\].*params/trainable"):
        objective(metrics, job)


def test_bad_sweeper_settings_name_the_key():
    s = sweeper()
    s.direction = "max"
    with pytest.raises(Exception, match="hydra.sweeper.direction=max: use maximize or minimize"):
        s._directions()
    s.direction = ["maximize", "minimize"]
    assert s._directions() == ["maximize", "minimize"]
    s.metric_names = ["val/acc"]
    with pytest.raises(Exception, match="1 objective\\(s\\), hydra.sweeper.direction=.* has 2"):
        s._metric_names(s._directions())
    grid = sweeper(sampler={"name": "grid"}, params={"optimizer.lr": "interval(1e-5, 1e-3)"})
    with pytest.raises(Exception, match="sampler=grid needs a finite set of values, but optimizer.lr"):
        grid._sampler(0, space_of(grid).distributions)


def test_hook_defaults_fill_only_what_the_user_left_null():
    class Defaults:
        def defaults(self, config, directions):
            return {"storage": "sqlite:///h.db", "study_name": "hooked", "metric_names": ["score"]}

    class Later:  # a later hook does not override an earlier one; a hook without the method is skipped
        def defaults(self, config, directions):
            return {"storage": "sqlite:///later.db", "study_name": "later"}

    s = sweeper()
    s.config, s.hooks = OmegaConf.create({}), [object(), Defaults(), Later()]
    s.study_name = "mine"
    s._hook_defaults(["maximize"])
    assert (s.storage_url, s.study_name, s.metric_names) == ("sqlite:///h.db", "mine", ["score"])


def test_clipqas_hooks_give_its_study_and_ask_for_names_of_several_objectives():
    from clipqa.metrics import OBJECTIVE
    from clipqa.sweep.optuna_hooks import MlflowStudyHooks
    from clipqa.sweep.optuna_trial import default_storage

    config = OmegaConf.create({"hydra": {"sweeper": {"metric_names": None}}})
    given = MlflowStudyHooks().defaults(config, ["maximize"])
    assert given == {"storage": default_storage(), "study_name": "clipqa", "metric_names": [OBJECTIVE]}
    with pytest.raises(Exception, match="hydra.sweeper.direction has 2 objectives: name them"):
        MlflowStudyHooks().defaults(config, ["maximize", "minimize"])
    config.hydra.sweeper.metric_names = ["val/acc", "params/trainable"]
    assert MlflowStudyHooks().defaults(config, ["maximize", "minimize"])["study_name"] == "clipqa"


def test_sweeper_is_discovered_with_its_sampler_group():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.clipqa_optuna_sweeper.sweeper.ClipqaOptunaSweeper" in found
    (shim,) = [c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "ClipqaOptunaSweeper"]
    assert isinstance(shim(**sweeper_settings()).sweeper, OptunaSweeperImpl)
    groups = ConfigStore.instance().repo["hydra"]["sweeper"]
    assert "clipqa_optuna.yaml" in groups
    samplers = groups["sampler"]
    for name in ("tpe", "random", "grid", "cmaes", "qmc", "nsgaii"):
        target = samplers[f"{name}.yaml"].node._target_
        module, cls = target.rsplit(".", 1)
        assert module == "optuna.samplers" and hasattr(optuna.samplers, cls)


def test_storages_sqlite_relative_path_and_journal_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rdb = make_storage("sqlite:///rel.db")
    optuna.create_study(study_name="a", storage=rdb)
    assert (tmp_path / "rel.db").is_file()
    journal = make_storage(f"journal://{tmp_path}/j.log")
    study = optuna.create_study(study_name="b", storage=journal, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="b", storage=make_storage(f"journal://{tmp_path}/j.log")).trials) == 2


def sweeper(**kw):
    sampler = OmegaConf.structured(SAMPLERS[kw.pop("sampler", {}).get("name", "tpe")])
    sampler = OmegaConf.merge(sampler, {"seed": 1, **kw.pop("sampler_args", {})})
    if "n_startup_trials" in sampler:
        sampler.n_startup_trials = 3
    pruner = OmegaConf.merge(OmegaConf.structured(PrunerConf), kw.pop("pruner", {}))
    params = kw.pop("params", {"mapper.num_layers": "range(0, 3)"})
    return OptunaSweeperImpl(
        sampler=sampler, direction="maximize", n_trials=4, n_jobs=1, storage=None, study_name="s", pruner=pruner,
        params=params,
    )  # fmt: skip


def sweeper_settings() -> dict:
    """The shim's keyword arguments, as Hydra passes hydra.sweeper.* (the schema's defaults)."""
    from hydra_plugins.clipqa_optuna_sweeper.config import ClipqaOptunaSweeperConf

    settings = OmegaConf.to_container(OmegaConf.structured(ClipqaOptunaSweeperConf))
    settings.pop("defaults"), settings.pop("_recursive_")
    settings["sampler"] = OmegaConf.structured(SAMPLERS["tpe"])
    return settings


def space_of(s: OptunaSweeperImpl, arguments: list[str] = ()):
    return search_space(s.params, list(arguments))


@pytest.mark.parametrize(
    "name, cls", [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"), ("none", "NopPruner")]
)
def test_pruners_are_selectable(name, cls):
    assert type(sweeper(pruner={"name": name})._pruner()).__name__ == cls


def sampled(name: str, seed: int, n: int, n_existing: int = 0) -> list[dict]:
    """The first n parameter sets the sweeper's sampler (hydra.sweeper.sampler.seed=seed) asks on a fresh study."""
    params = {"mapper.num_layers": "range(0, 4)", "optimizer": "choice(adam, adamw, sgd)"}  # a 12-point grid
    if name != "grid":
        params["optimizer.lr"] = "tag(log, interval(1e-5, 1e-2))"
    s = sweeper(sampler={"name": name}, sampler_args={"seed": seed}, params=params)
    space = space_of(s).distributions
    study = optuna.create_study(sampler=s._sampler(n_existing, space), direction="maximize")
    asked = []
    for i in range(n):
        trial = study.ask(space)
        asked.append(trial.params)
        if i < n - 1:  # the last one stays running: a finished grid would stop the study
            study.tell(trial, 0.0)
    return asked


@pytest.mark.parametrize("name, cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("grid", "GridSampler")])
def test_samplers_are_selectable_and_seeded(name, cls):
    s = sweeper(sampler={"name": name})
    space = space_of(s).distributions
    assert type(s._sampler(0, space)).__name__ == cls
    n = 12 if name == "grid" else 3  # grid: its whole (seeded) order; tpe: its random start-up trials
    first = sampled(name, seed=1, n=n)
    assert sampled(name, seed=1, n=n) == first  # the same seed asks the same values in the same order
    assert sampled(name, seed=2, n=n) != first  # another seed, other values (grid: the same points, reordered)
    if name == "grid":  # every point once, in either order
        points = sorted(map(str, first))
        assert len(set(points)) == 12 and sorted(map(str, sampled(name, seed=2, n=n))) == points
    else:  # a resumed study (2 trials already in it) does not replay the start-up trials of the first run
        assert sampled(name, seed=1, n=n, n_existing=2) != first
    if name == "grid":  # ... but a grid keeps its order: its points are numbered by trial, resumed or not
        assert s._sampler(5, space)._all_grids == s._sampler(0, space)._all_grids


def test_command_line_sweeps_join_and_plain_values_leave_the_space():
    s = sweeper()
    space = space_of(s, ["optimizer=adam,adamw", "mapper.num_layers=1", "experiment=demo"])
    assert set(space.distributions) == {"optimizer"} and space.fixed == ["mapper.num_layers=1", "experiment=demo"]
    assert space.overrides({"optimizer": "adamw"}) == ["mapper.num_layers=1", "experiment=demo", "optimizer=adamw"]


def test_params_entries_are_replaced_by_the_command_line():
    s = sweeper(params={"optimizer": "choice(adam, sgd)", "+extra": "choice(1, 2)", "freeze": "vision"})
    space = space_of(s, ["optimizer=adamw,sgd", "freeze=text,vision"])
    assert set(space.distributions) == {"optimizer", "+extra", "freeze"} and space.fixed == []
    assert list(space.distributions["optimizer"].choices) == ["adamw", "sgd"]
    space = space_of(s, ["+extra=3"])
    assert set(space.distributions) == {"optimizer"} and space.fixed == ["freeze=vision", "+extra=3"]


def test_mlflow_parent_status_counts_pruned_trials_as_fine():
    from types import SimpleNamespace

    from clipqa.sweep.mlflow_parent import job_counts

    def run(status, **tags):
        return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(tags=tags))

    runs = [run("FINISHED")] * 4 + [run("KILLED", **{"clipqa.pruned": "true"})] * 2
    assert job_counts(runs) == {"finished": 4, "pruned": 2, "failed": 0}
    assert job_counts([*runs, run("FAILED"), run("KILLED"), run("RUNNING")])["failed"] == 3
