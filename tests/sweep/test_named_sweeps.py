"""Named sweeps (conf/sweep/*.yaml, ``python train.py -m sweep=NAME``), their deprecated ``-cd sweeps -cn NAME``
alias (sweeps/*.yaml) and the Optuna sweeper: composition (fast) and smoke runs on the demo (slow). Every sweep file
and every value it sweeps is composed by tests/test_config.py."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from clipqa.config import validate
from clipqa.training.schedule import resolve_phases
from tests.helpers.runs import CONF, ROOT, SMALL_DEMO, run_cli

SWEEPS = sorted((CONF / "sweep").glob("*.yaml"))
ALIASES = sorted((ROOT / "sweeps").glob("*.yaml"))
# The small demo, smaller still (every sweep job trains), tracked: the sweeps' reports read MLflow.
TINY = [*SMALL_DEMO, "tracking=mlflow", "data.synthetic.n_train=300", "data.synthetic.n_test=60"]


def compose_sweep(name: str, overrides: list[str]):
    """``python train.py -m sweep=NAME OVERRIDES``'s config, Hydra's keys included."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"sweep={name}", *overrides], return_hydra_config=True)


def compose_alias(name: str, overrides: list[str]):
    """``python train.py -cd sweeps -cn NAME OVERRIDES``'s config (train.py keeps conf/ on the search path)."""
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        return compose(
            config_name=name, overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides], return_hydra_config=True
        )


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_composes_with_a_header_and_sweeps_something(path: Path):
    cfg = compose_sweep(path.stem, ["experiment=demo"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    header = path.read_text().split("defaults:")[0].split("\nhydra:")[0]
    assert "Question:" in header and f"python train.py -m sweep={path.stem}" in header and "Cost" in header
    cfg_for_run = {k: v for k, v in cfg.items() if k != "hydra"}
    from omegaconf import OmegaConf

    validate(OmegaConf.create(cfg_for_run))


# The sweeps that existed when `-cd sweeps -cn NAME` was the command: each keeps its alias until it is removed.
# Sweeps added since (backbones, tiny_backbones) never had the old command, so they get no alias.
OLD_SWEEPS = ["freeze", "image_tokens", "mapper_depth", "optimizer", "optuna", "optuna_tradeoff", "paper", "seeds"]


def test_every_old_sweep_has_its_deprecated_alias_and_no_alias_is_left_without_a_sweep():
    assert [p.stem for p in ALIASES] == OLD_SWEEPS
    assert set(OLD_SWEEPS) <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", ALIASES, ids=lambda p: p.stem)
@pytest.mark.parametrize("overrides", [[], ["experiment=demo", "freeze=vision"]])
def test_the_deprecated_alias_is_the_same_sweep_and_prints_the_new_command(path: Path, overrides, capsys):
    """`-cd sweeps -cn NAME` (sweeps/NAME.yaml, a stub) gives exactly `sweep=NAME`'s run config and sweep, with the
    command line still winning (freeze=vision over mapper_depth's freeze=text), and says the new command."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    old, new = compose_alias(path.stem, overrides), compose_sweep(path.stem, overrides)
    job = {k: v for k, v in OmegaConf.to_container(old).items() if k != "hydra"}
    assert job == {k: v for k, v in OmegaConf.to_container(new).items() if k != "hydra"}
    assert old.hydra.sweeper == new.hydra.sweeper and old.hydra.mode == new.hydra.mode
    callbacks = dict(old.hydra.callbacks)
    alias = callbacks.pop("deprecated_alias")
    assert callbacks == dict(new.hydra.callbacks)
    instantiate(alias).on_multirun_start(old)
    err = capsys.readouterr().err
    given = [f"hydra.searchpath=[file://{CONF}]", *overrides]  # quoted for a shell where it needs it
    expected = " ".join(["python train.py -m", f"sweep={path.stem}", *map(shlex.quote, given)])
    assert f"`-cd sweeps -cn {path.stem}` is deprecated" in err and f"use: {expected}" in err


@pytest.mark.parametrize(
    "version, phases", [("V1", ["train"]), ("V2", ["train"]), ("V3", ["V2", "V3"]), ("V4", ["V2", "V3", "V4"])]
)
def test_paper_versions_are_staged_runs_with_the_papers_settings(version, phases):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"+paper={version}"]))
    assert cfg.tracking.run_name == version
    # the original script's model: the answer read at the last position (output[:, -1]) by Linear(768, vocab,
    # bias=False)
    assert cfg.head.kind == "vocab" and cfg.head.readout == "last" and cfg.head.bias is False
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4 and cfg.trainer.batch_size == 8
    resolved = resolve_phases(cfg)
    assert [p.name for p in resolved] == phases
    assert resolved[0].lr == 1e-4 and resolved[0].freeze == {"vision": True, "text": True, "mapper": False}
    if version != "V1":
        assert cfg.mapper.num_layers == 2 and cfg.mapper.hidden_dim == 1024
    if len(resolved) > 1:  # V3/V4: text unfrozen at lr 1e-5 with a fresh Adam, V4 one more epoch of the same
        assert resolved[1].lr == pytest.approx(1e-5) and resolved[1].freeze["text"] is False
        assert resolved[1].fresh_optimizer
    if version == "V4":  # the original ran its script again on V3's weights: a fresh Adam again
        assert resolved[2].lr == pytest.approx(1e-5) and resolved[2].fresh_optimizer
        assert resolved[2].freeze == {"vision": True, "text": False, "mapper": False}


def test_the_main_config_is_the_ablation_base_and_says_so():
    """conf/config.yaml reads [CLS] with a biased head (the suite's default, README); its header says so and
    names +paper=V2 as the paper's model."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=["experiment=demo"]))
    assert cfg.head.readout == "cls" and cfg.head.bias is True
    header = (CONF / "config.yaml").read_text().split("defaults:")[0]
    assert "head.readout=cls" in header and "+paper=V2" in header


@pytest.mark.parametrize("order", ["experiment first", "paper first"])
def test_the_demo_scales_the_papers_schedule_keeping_phases_freeze_flags_and_lr_ratios(order):
    """Bug caught: under experiment=demo the paper's versions trained 1 epoch (113 steps) at the paper's schedule,
    too few for any frozen-text version to learn; or a demo setting that silently replaced the paper's phases or
    freeze flags. Whichever order they are given in, +paper=V3 keeps its two phases, frozen text then unfrozen at
    0.1 x the learning rate with a fresh optimizer, each lasting conf/experiment/demo.yaml's epoch_multiplier passes."""
    overrides = ["experiment=demo", "+paper=V3"]
    cfg = validate(compose_sweep("paper", overrides if order == "experiment first" else overrides[::-1]))
    times = cfg.trainer.epoch_multiplier
    assert times > 1 and cfg.optimizer.lr == 2e-3  # the demo's multiplier and base learning rate
    v2, v3 = resolve_phases(cfg)
    assert (v2.name, v2.epochs, v2.lr, v2.freeze["text"]) == ("V2", times, 2e-3, True)
    assert (v3.name, v3.epochs, v3.freeze["text"], v3.fresh_optimizer) == ("V3", times, False, True)
    assert v3.lr == pytest.approx(0.1 * v2.lr)
    assert cfg.head.readout == "last" and cfg.mapper.num_layers == 2  # still the paper's model
    assert cfg.backbone.tiny.pretrain is not None  # the pretrained tiny backbones


def test_the_demos_own_run_is_five_passes_and_smoke_stays_two():
    """Bug caught: the demo's multiplier leaking into the smoke test (10 passes instead of 2: the fast tier slows)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        demo = validate(compose(config_name="config", overrides=["experiment=demo"]))
        smoke = validate(compose(config_name="config", overrides=["experiment=smoke"]))
    assert [p.epochs for p in resolve_phases(demo)] == [5]
    assert [p.epochs for p in resolve_phases(smoke)] == [2]


@pytest.mark.parametrize("name", ["optuna", "optuna_tradeoff"])
def test_the_optuna_search_on_the_demo_brackets_the_demos_learning_rate(name):
    """Bug caught: the Optuna search on the demo drawing most learning rates from the hub models' range
    (1e-5..3e-3), where the tiny demo models learn nothing in a few hundred steps: a 6-trial search ended at the
    answer prior. The demo's backbone gets its own range around its base lr; COCO-QA's search is unchanged."""
    hub = compose_sweep(name, [])
    assert hub.hydra.sweeper.params["optimizer.lr"] == "tag(log, interval(1e-5, 3e-3))"
    for experiment in ("experiment=demo", "experiment=smoke"):
        cfg = compose_sweep(name, [experiment])
        params = dict(cfg.hydra.sweeper.params)
        assert params.pop("optimizer.lr") == "tag(log, interval(2e-4, 1e-2))"
        assert 2e-4 < cfg.optimizer.lr < 1e-2  # the demo's base learning rate lies inside
        assert params == {k: v for k, v in hub.hydra.sweeper.params.items() if k != "optimizer.lr"}  # same space


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, n_jobs",
    [("paper", 4), ("mapper_depth", 8), ("freeze", 4), ("optimizer", 9), ("seeds", 3), ("image_tokens", 3)],
)
def test_every_named_sweep_runs_on_the_demo_from_another_directory(name, n_jobs, tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = run_cli(
        "-m",
        f"sweep={name}",
        *TINY,
        "trainer.max_steps=2",
        f"tracking.uri={uri}",
        "tracking.experiment=s",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == n_jobs
    md = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert md.count("\n| `") >= (2 if name != "seeds" else 1)
    if name == "freeze":  # the staged job really ran two phases
        staged = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/metrics.json")]
        assert sum("phase/unfrozen_text/test/acc" in m for m in staged) == 1
    if name == "paper":  # V1..V4 with WUPS, the paper's numbers and the paired comparison with V1
        assert all(f"| `{v}` |" in md for v in ("V1", "V2", "V3", "V4")) and "paper acc % (80 q)" in md
        head = md.split("\n\n")[1].splitlines()[0]
        assert "WUPS@0.9 %" in head and "WUPS@0.0 %" in head and "Δ acc vs `V1` (points)" in head
        assert "p (Holm)" in head and md.count("McNemar (b=") == 3
        assert all(json.loads(p.read_text())["test/wups_0.9"] >= 0 for p in (tmp_path / "sweep").glob("*/metrics.json"))
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
        v4 = next(x for x in runs if x.info.run_name == "V4")
        assert {"phase/V2/test/acc", "phase/V3/test/acc", "phase/V4/test/acc"} <= set(v4.data.metrics)
    if name == "seeds":  # runs differing only by trainer.seed: one row, n = 3
        rows = [line for line in md.split("\n\n")[1].splitlines() if line.startswith("| `")]
        assert len(rows) == 1 and rows[0].startswith("| `same config (seeds 1, 2, 3)` | 3 |")
    if name == "image_tokens":  # one feature cache per token choice, each with its own token count
        from clipqa.models.feature_cache import FeatureStore

        stores = [d for d in (Path(os.environ["CLIPQA_CACHE_DIR"]) / "features").iterdir() if d.is_dir()]
        assert {1, 4} <= {FeatureStore(d).shape[0] for d in stores}


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-cd", "sweeps", "-cn", "seeds"], ["sweep=seeds"]], ids=["alias", "no -m"])
def test_the_alias_and_a_sweep_without_dash_m_run_the_sweep(command, tmp_path):
    """`-cd sweeps -cn seeds` from the project folder (Hydra resolves -cd against the working directory) runs the
    sweep and says the new command first; `sweep=seeds` without -m is a multirun too (the file's hydra.mode)."""
    r = run_cli(
        *command,
        *SMALL_DEMO,
        "trainer.max_steps=1",
        "hydra.sweeper.params={trainer.seed:1}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=ROOT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 1
    deprecated = "`-cd sweeps -cn seeds` is deprecated and will be removed; use: python train.py -m sweep=seeds "
    assert (deprecated in r.stderr) == (command[0] == "-cd"), r.stderr[-3000:]


def optuna_cmd(tmp_path, n_trials: int, sweep: str, *extra: str) -> list[str]:
    return [
        "-m",
        "sweep=optuna",
        *TINY,
        "trainer.max_steps=12",
        "trainer.eval_every=3",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'o.db'}",
        "hydra.sweeper.study_name=s",
        f"hydra.sweep.dir={tmp_path / sweep}",
        *extra,
    ]


@pytest.mark.slow
def test_optuna_study_prunes_resumes_and_tags_the_best_trial(tmp_path):
    import optuna
    from optuna.trial import TrialState

    # A learning rate that learns and one that cannot: the median pruner has something to prune.
    contrast = ["optimizer.lr=1e-7,3e-3", "freeze=vision", "hydra.sweeper.pruner.n_startup_trials=1"]
    r = run_cli(*optuna_cmd(tmp_path, 6, "a", *contrast))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and TrialState.PRUNED in states, states
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("clipqa").experiment_id])
    trials = [x for x in runs if "optuna.trial" in x.data.tags]
    assert len(trials) == 6 and all(x.info.run_name.startswith("trial ") for x in trials)
    assert any(x.data.tags.get("clipqa.pruned") == "true" and x.info.status == "KILLED" for x in trials)
    (best,) = [x for x in trials if x.data.tags.get("clipqa.best_trial") == "true"]
    assert best.data.tags["optuna.trial"] == str(study.best_trial.number)
    assert float(best.data.params["optimizer.lr"]) == study.best_trial.params["optimizer.lr"]
    (parent,) = [x for x in runs if x.data.tags.get("clipqa.sweep") == "true"]  # pruning is not failing
    assert parent.info.status == "FINISHED" and parent.data.tags["clipqa.failed_jobs"] == "0", parent.data.tags

    r = run_cli(*optuna_cmd(tmp_path, 8, "b", *contrast))  # same storage + study, larger n_trials: exactly 2 more
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert len(study.trials) == 8
    assert [t.number for t in study.trials] == list(range(8))
    runs = client.search_runs([client.get_experiment_by_name("clipqa").experiment_id])
    (best,) = [x for x in runs if x.data.tags.get("clipqa.best_trial") == "true"]  # one, over both sweeps
    assert best.data.tags["optuna.trial"] == str(study.best_trial.number)


@pytest.mark.slow
def test_two_sweep_processes_share_one_precreated_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *optuna_cmd(tmp_path, 4, f"p{i}", "tracking=none", "hydra.sweeper.pruner.name=none"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    study = optuna.load_study(study_name="s", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) >= 4 and len(done) == len(study.trials)
    assert all(len(list((tmp_path / f"p{i}").glob("*/metrics.json"))) >= 1 for i in range(2))


@pytest.mark.slow
def test_failed_trials_are_recorded_and_all_failing_exits_non_zero(tmp_path):
    import optuna

    r = run_cli(
        *optuna_cmd(
            tmp_path, 2, "f", "data.synthetic=null", "data.root=/no/such/cocoqa", "data.image_root=/no/such/coco"
        )
    )
    assert r.returncode != 0
    assert "all 2 trials failed" in r.stdout + r.stderr and "/no/such/cocoqa" in r.stdout + r.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.get_experiment_by_name("clipqa").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`clipqa.sweep` = 'true'")
    assert parent.info.status == "FAILED" and "all 2 trials failed" in parent.data.tags["clipqa.error"]


def test_clipqa_cache_takes_a_sweep_as_an_override_and_names_it_for_the_old_flags(capsys):
    """`clipqa-cache sweep=NAME [overrides]` composes the sweep's base config as train.py does (here refused before
    any build: freeze=none trains the vision tower); the gone `-cd sweeps -cn NAME` says what to type instead."""
    from clipqa import cli

    with pytest.raises(SystemExit) as exit_:
        cli.cache(["sweep=seeds", *SMALL_DEMO, "freeze=none"])
    assert exit_.value.code == 2 and "trains the vision tower" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.cache(["sweep=no_such_sweep", *SMALL_DEMO])
    assert exit_.value.code == 2 and "no_such_sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.cache(["-cd", "sweeps", "-cn", "paper", *SMALL_DEMO])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.endswith(f"Use: clipqa-cache sweep=paper {' '.join(SMALL_DEMO)}\n"), err
