"""A group chosen on the command line that a paper or experiment file replaces gets one warning naming both and
what ran (clipqa/overrides.py); choices the command line keeps get none."""

import pytest

from clipqa.overrides import replaced_choices
from tests.helpers.runs import ROOT, compose_cfg, run_cli


def check(overrides: list[str]) -> list[str]:
    return replaced_choices(overrides, compose_cfg(overrides), compose_cfg)


@pytest.mark.parametrize(
    "overrides, named, shown",
    [
        (["freeze=staged", "+paper=V2"], "+paper=V2", "trainer.phases=null"),  # V2: one phase, text frozen
        # ~0.7 s each (composing the config several times): slow
        pytest.param(["+paper=V1", "freeze=none"], "+paper=V1", "freeze.text=true (not false)", marks=pytest.mark.slow),
        pytest.param(
            ["freeze=vision", "+paper=V4", "experiment=demo"], "+paper=V4", "freeze.text=true", marks=pytest.mark.slow
        ),
        pytest.param(  # a job of sweep=paper
            ["freeze=staged", "sweep=paper", "+paper=V3"], "+paper=V3", "trainer.phases=", marks=pytest.mark.slow
        ),
    ],
)
def test_a_replaced_group_choice_is_named_with_what_replaced_it_and_what_ran(overrides, named, shown):
    """Catches: freeze=staged +paper=V2 running V2 without a word (the paper's file wins, by design)."""
    (message,) = check(overrides)
    chosen = next(o for o in overrides if o.startswith("freeze="))
    assert message.startswith(f"{chosen} on the command line was replaced by {named}: what ran has "), message
    assert shown in message and f"This run is not {chosen}" in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=demo", "freeze=staged"],  # the experiment's `override /freeze: vision` loses to the command line
        pytest.param(["experiment=smoke", "tracking=mlflow", "backbone=hub"], marks=pytest.mark.slow),
        pytest.param(["freeze=text", "+paper=V2"], marks=pytest.mark.slow),  # the same policy as the paper's
        # the documented way to run the paper on the demo: the experiment is no axis
        ["experiment=demo", "+paper=V2"],
        pytest.param(  # the key given: the user's wins
            ["freeze=staged", "+paper=V2", "trainer.phases=[{name: a, epochs: 1}]"], marks=pytest.mark.slow
        ),
        ["freeze=staged"],
    ],
)
def test_choices_that_take_effect_are_not_warned_about(overrides):
    assert check(overrides) == []


@pytest.mark.slow
def test_train_py_warns_once_in_the_runs_log(tmp_path, cache_dir):
    r = run_cli("experiment=smoke", "freeze=staged", "+paper=V2", "trainer.epochs=1", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "train.log").read_text()
    assert log.count("freeze=staged on the command line was replaced by +paper=V2") == 1, log[-3000:]
    assert str(ROOT) not in log.split("replaced by")[1].splitlines()[0]
