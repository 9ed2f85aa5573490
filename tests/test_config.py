"""Every config file composes and passes the typed boundary; bad values fail at start-up naming the key. A named
sweep (conf/sweep/) also composes every value it sweeps (slow tier: ~100 compositions)."""

import functools
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from clipqa.config import validate
from clipqa.errors import ClipqaError
from tests.helpers.runs import CONF, compose_cfg

# Hydra's own groups (conf/hydra/launcher/) configure Hydra, not the run: tests/test_slurm_config.py composes those.
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF and "hydra" not in p.relative_to(CONF).parts)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_file_composes_and_validates(path: Path):
    group, name = path.parent.relative_to(CONF).as_posix(), path.stem
    # a nested group (backbone/vision) is chosen by its parent's defaults list (conf/backbone/hub.yaml)
    in_defaults = f"- {group}:" in (CONF / "config.yaml").read_text() or "/" in group
    overrides = [f"{group}={name}" if in_defaults else f"+{group}={name}"]
    if group == "data" and name == "cocoqa":
        overrides += ["data.root=x", "data.image_root=y"]
    if group == "optuna_space":  # <sweep>_<backbone>.yaml, picked by conf/config.yaml's defaults list
        overrides = optuna_space_overrides(name)
    cfg = validate(compose_cfg(overrides))
    assert path.read_text().startswith("#"), f"{path} needs a header comment: what it is for and the command"
    # The file's own values are what the run gets: none dropped, renamed, moved or overridden by its defaults.
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    own.pop("defaults", None)
    own_hydra = own.pop("hydra", {})  # Hydra's keys: compared with the composed hydra config below
    header = path.read_text().split("\n", 1)[0]
    package = header.split()[-1] if header.startswith("# @package") else group
    package = "" if package == "_global_" else package
    on_command_line = {o.lstrip("+").split("=", 1)[0] for o in overrides[1:]}
    if group == "optuna_space":
        own_hydra, own = {"sweeper": {"params": own}}, {}
    assert_has_values(cfg, own, package, on_command_line)
    if group in ("sweep", "optuna_space"):
        hydra_cfg = check_sweep(CONF, overrides, name if group == "sweep" else None, values=False)
        assert_subset(OmegaConf.to_container(hydra_cfg.hydra), own_hydra, "hydra")
        if group == "optuna_space":
            assert hydra_cfg.hydra.runtime.choices.optuna_space == name, "not picked by the defaults list"


SWEEP_NAMES = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def optuna_space_overrides(name: str) -> list[str]:
    """conf/optuna_space/<sweep>_<backbone>.yaml: the sweep and backbone that pick it."""
    sweep = max((s for s in SWEEP_NAMES if name.startswith(f"{s}_")), key=len, default=None)
    assert sweep, f"conf/optuna_space/{name}.yaml: its name must be <sweep>_<backbone> (sweeps: {SWEEP_NAMES})"
    return [f"sweep={sweep}", f"backbone={name[len(sweep) + 1 :]}"]


def compose_in(conf: Path, overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def swept_values(params) -> list[str]:
    """One override per value a sweep can give a key: each of a grid's (a,b,c), choice(...) and range(...) values,
    both ends of an interval(...)."""
    overrides = []
    for key, value in params.items():
        (o,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
        v = o.value()
        if isinstance(v, IntervalSweep):
            values = [str(v.start), str(v.end)]
        elif o.is_sweep_override():
            values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
        overrides += [f"{o.get_key_element()}={x}" for x in values]
    return overrides


def check_sweep(conf: Path, overrides: list[str], name: str | None, values: bool = True) -> DictConfig:
    """A named sweep (sweep=NAME, or the sweep an optuna_space file belongs to) is a multirun that sweeps something,
    its header says what and the command, and (``values``) every value it sweeps composes and validates, on
    COCO-QA's config and the demo's. Returns the composed config with Hydra's keys."""
    cfg = compose_in(conf, overrides, hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN, "a sweep file sets hydra.mode: MULTIRUN"
    assert cfg.hydra.sweeper.params, "a sweep file sets hydra.sweeper.params"
    if name is not None:
        header = (conf / "sweep" / f"{name}.yaml").read_text().split("\ndefaults:")[0].split("\nhydra:")[0]
        for needed in ("# @package _global_", "Question:", f"python train.py -m sweep={name}", "Cost", "Reading"):
            assert needed in header, f"conf/sweep/{name}.yaml: its header comment needs {needed!r}"
    for base in ([], ["experiment=demo"]) if values else ():
        params = compose_in(conf, [*overrides, *base], hydra=True).hydra.sweeper.params
        for value in swept_values(params):
            try:
                composes_and_validates(conf, (*overrides, *base, value))
            except (HydraException, ClipqaError) as e:
                raise AssertionError(f"{overrides + base}: the swept value {value} fails: {e}") from e
    return cfg


SWEEP_FILES = sorted(p for p in GROUP_FILES if p.parent.name in ("sweep", "optuna_space"))


@pytest.mark.slow  # ~100 compositions (~20 s): the fast tier composes each sweep file, this every value it sweeps
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_value_a_sweep_sweeps_composes_and_validates(path: Path):
    """Bug caught: a sweep whose jobs all die at start-up (a misspelt swept key, a value the typed boundary refuses,
    an interval end out of range) passing, because only its base config was composed."""
    if path.parent.name == "sweep":
        check_sweep(CONF, [f"sweep={path.stem}"], path.stem)
    else:
        check_sweep(CONF, optuna_space_overrides(path.stem), None)


@functools.cache
def composes_and_validates(conf: Path, overrides: tuple[str, ...]) -> None:
    """Compose and validate once per (conf folder, overrides): an optuna_space file's check repeats its sweep's
    values, and a composition costs ~0.1 s (the fast tier's budget is shared by every test)."""
    validate(compose_in(conf, list(overrides)))


def assert_subset(got, expected, where: str) -> None:
    """Every key of ``expected`` (Hydra's keys of a file) is in ``got`` with that value."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert isinstance(got, dict) and key in got, f"{where}.{key} is set in the file but not composed"
            assert_subset(got[key], value, f"{where}.{key}")
    else:
        got = getattr(got, "name", got)  # hydra.mode: RunMode.MULTIRUN
        assert got == expected, f"{where}: the file sets {expected!r}, the composed config has {got!r}"


PARAMS = "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n"  # then the swept keys, 6 spaces in
BROKEN_SWEEPS = {  # what is wrong: (the file after its header, what the failure names)
    "a swept key that does not exist": (PARAMS + "      mapper.num_layer: 0,1\n", "mapper.num_layer=0"),
    "a swept value the typed boundary refuses": (PARAMS + "      mapper.num_layers: 1,-1\n", "mapper.num_layers=-1"),
    "an unknown group option swept": (PARAMS + "      optimizer: adam,adagradx\n", "adagradx"),
    "an interval end the typed boundary refuses": (
        PARAMS + "      optimizer.lr: tag(log, interval(-1, 1e-3))\n",
        "optimizer.lr=-1",
    ),
    "a bad value of its own": ("trainer:\n  eval_every: often\n" + PARAMS + "      trainer.seed: 1,2\n", "eval_every"),
    "an override of a group that does not exist": ("defaults:\n  - override /mapperr: mlp\n" + PARAMS, "mapperr"),
    "no hydra.mode: MULTIRUN": ("hydra:\n  sweeper:\n    params:\n      trainer.seed: 1,2\n", "MULTIRUN"),
    "nothing swept": ("hydra:\n  mode: MULTIRUN\n", "hydra.sweeper.params"),
    "no header": (PARAMS + "      trainer.seed: 1,2\n", "Question:"),
}


@pytest.mark.parametrize("broken", BROKEN_SWEEPS)
def test_a_broken_sweep_file_fails_the_check(broken, tmp_path):
    """Bug caught: a sweep file whose jobs all die at start-up (a misspelt swept key, a value the typed boundary
    refuses) passing the config tests, because only its base config was composed."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    body, named = BROKEN_SWEEPS[broken]
    header = "# @package _global_\n"
    if broken != "no header":
        header += "# Question: q?\n#   python train.py -m sweep=broken\n# Cost: 2 runs. Reading: x.\n"
    (conf / "sweep" / "broken.yaml").write_text(header + body)
    with pytest.raises((AssertionError, HydraException, ClipqaError)) as e:
        validate(compose_in(conf, ["sweep=broken"]))
        check_sweep(conf, ["sweep=broken"], "broken")
    assert named in str(e.value)


def assert_has_values(cfg, expected, where: str, skip: set[str]) -> None:
    """Every leaf of ``expected`` is in ``cfg`` at ``where`` + its key path with that value (lists item by item)."""
    if where in skip:
        return
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_has_values(cfg, value, f"{where}.{key}" if where else str(key), skip)
    elif isinstance(expected, list):
        got = OmegaConf.select(cfg, where, throw_on_missing=True)
        assert got is not None and len(got) == len(expected), (where, got, expected)
        for i, item in enumerate(expected):
            assert_has_values(cfg, item, f"{where}[{i}]", skip)
    else:
        marker = object()
        got = OmegaConf.select(cfg, where, default=marker, throw_on_missing=True)
        assert got is not marker, f"{where} is set in the file but missing from the composed config"
        if not (isinstance(expected, str) and "${" in expected):  # an interpolation: resolved by validate
            assert got == expected, f"{where}: the file sets {expected!r}, the composed config has {got!r}"


def test_main_config_is_the_paper_setup():
    cfg = validate(compose_cfg([]))
    assert cfg.backbone.vision == "openai/clip-vit-base-patch32"
    assert cfg.backbone.text == "distilbert-base-uncased"
    assert (cfg.mapper.num_layers, cfg.mapper.hidden_dim, cfg.mapper.final_activation) == (2, 1024, True)
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4
    assert list(cfg.optimizer.betas) == [0.9, 0.999] and cfg.optimizer.eps == 1e-8
    assert cfg.trainer.batch_size == 8 and cfg.trainer.epochs == 1
    assert cfg.freeze.vision and cfg.freeze.text
    assert cfg.data.val_fraction == 0.1 and cfg.data.split_seed == 42


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=abc", "optimizer.lr"),
        ("mapper.num_layers=-1", "mapper.num_layers"),
        ("mapper.hidden_dim=0", "mapper.hidden_dim"),
        ("mapper.num_layers=two", "mapper.num_layers"),
        ("optimizer._target_=torch.optim.NoSuchOptimizer", "optimizer._target_"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("head.kind=softmax", "head.kind"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("+optimizer.lrr=0.1", "lrr"),
        ("+mapper.layers=3", "layers"),
    ],
)
def test_bad_config_values_fail_at_startup_naming_the_key(override, key):
    with pytest.raises(ClipqaError) as e:
        validate(compose_cfg(["experiment=demo", override]))
    assert key in str(e.value)


def test_unknown_group_option_and_misspelt_key_are_refused_by_hydra_naming_them():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg(["optimizer=adagradx"])
    assert "optimizer" in str(e.value) and "adagradx" in str(e.value)
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["optimizer.lrr=0.1"])
    assert "optimizer.lrr" in str(e.value)
