"""Every config file composes and passes the typed boundary; bad values fail at start-up naming the key."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from clipqa.config import validate
from clipqa.errors import ClipqaError
from tests.helpers.runs import CONF, compose_cfg

# Hydra's own groups (conf/hydra/launcher/) configure Hydra, not the run: tests/test_slurm_config.py composes those.
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF and "hydra" not in p.relative_to(CONF).parts)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_file_composes_and_validates(path: Path):
    group, name = path.parent.relative_to(CONF).as_posix(), path.stem
    in_defaults = f"- {group}:" in (CONF / "config.yaml").read_text()
    overrides = [f"{group}={name}" if in_defaults else f"+{group}={name}"]
    if group == "data" and name == "cocoqa":
        overrides += ["data.root=x", "data.image_root=y"]
    cfg = validate(compose_cfg(overrides))
    assert path.read_text().startswith("#"), f"{path} needs a header comment: what it is for and the command"
    # The file's own values are what the run gets: none dropped, renamed, moved or overridden by its defaults.
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    own.pop("defaults", None)
    package = "" if path.read_text().startswith("# @package _global_") else group
    on_command_line = {o.lstrip("+").split("=", 1)[0] for o in overrides[1:]}
    assert_has_values(cfg, own, package, on_command_line)


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
