"""The Optuna sweeper's pieces: search-space grammar, storages, samplers and pruners (fast, no training)."""

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from clipqa.optuna_study import make_storage
from hydra_plugins.clipqa_optuna_sweeper.sweeper import ClipqaOptunaSweeper, distribution


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
    sampler = OmegaConf.create({"name": "tpe", "seed": 1, "n_startup_trials": 3, **kw.pop("sampler", {})})
    pruner = OmegaConf.create(
        {
            "name": "median",
            "n_startup_trials": 2,
            "n_warmup_steps": 0,
            "min_resource": 1,
            "max_resource": "auto",
            "reduction_factor": 3,
            **kw.pop("pruner", {}),
        }
    )
    params = kw.pop("params", {"mapper.num_layers": "range(0, 3)"})
    return ClipqaOptunaSweeper("maximize", 4, 1, None, "s", sampler, pruner, params)


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
    s = sweeper(sampler={"name": name, "seed": seed}, params=params)
    space, _ = s._space([])
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
    space, _ = s._space([])
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


def test_command_line_sweeps_join_and_plain_values_leave_the_space():
    s = sweeper()
    space, fixed = s._space(["optimizer=adam,adamw", "mapper.num_layers=1", "experiment=demo"])
    assert set(space) == {"optimizer"} and fixed == ["mapper.num_layers=1", "experiment=demo"]
