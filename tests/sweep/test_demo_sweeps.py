"""The named sweeps on the offline demo give the comparisons they exist for (slow: full demo schedules).

The demo is a miniature of the real setup (pretrained tiny backbones, backbone=tiny_pretrained; one paper epoch =
trainer.epoch_multiplier passes): these tests pin the orderings the README's demo table shows, with the seeds fixed
(trainer.seed, the demo data's and the pretraining's seeds are all in the configs). Each trains only the runs its
ordering needs (V1 + V4, freeze=vision + staged; V2, V3 and freeze=text are phases of these): 7 x 565 steps instead
of 12 x 565, plus one backbone build; 11.8 minutes measured on 2 CPU cores at a load average of 3-7.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import run_cli

pytestmark = pytest.mark.slow


def sweep(tmp_path: Path, name: str, key: str, values: str) -> dict[str, dict]:
    """Run ``sweep=<name>`` (conf/sweep/) on the demo with ``key=values``; each job's metrics.json by its ``key``."""
    r = run_cli(
        "-m", f"sweep={name}", "experiment=demo", "tracking=none", f"{key}={values}",
        f"hydra.sweep.dir={tmp_path}", timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = {}
    for path in tmp_path.glob("*/metrics.json"):
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        value = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key)
        runs[value] = json.loads(path.read_text())
    assert set(runs) == set(values.split(",")), runs.keys()
    return runs


def test_the_paper_sweep_on_the_demo_shows_the_papers_ordering(tmp_path):
    """Bug caught: the demo's paper table below the answer prior (V1/V2 at ~24% with random backbones and 113
    steps), so a user cannot tell a broken suite from a demo that is too small. The paper: V1 28.8 < V2 51.3 <
    V3 55.0 < V4 62.5 (%, 80 questions). Measured (README): V1 30.8, V2 62.6, V3 93.4, V4 94.4, prior 23.8.

    Only V1 and V4 are trained: V4's run trains V2's and V3's phases first and logs their test metrics
    (phase/V2/..., phase/V3/...), the same numbers as V2's and V3's own runs (same seeds), at half the cost."""
    runs = sweep(tmp_path, "paper", "+paper", "V1,V4")
    v4 = runs["V4"]
    acc = {"V1": runs["V1"]["test/acc"], "V2": v4["phase/V2/test/acc"], "V3": v4["phase/V3/test/acc"]}
    acc["V4"] = v4["test/acc"]
    prior = v4["test/prior_acc"]
    assert acc["V1"] >= prior + 0.04, (acc, prior)  # frozen text, raw CLIP tokens: above the prior
    assert acc["V2"] >= acc["V1"] + 0.2, acc  # the mapper makes the frozen text model useful
    assert acc["V3"] >= acc["V2"] + 0.15, acc  # unfreezing the text model (0.1 x lr) adds to it
    assert acc["V4"] >= acc["V3"] - 0.02, acc  # and one more stage keeps it


def test_the_freeze_sweep_on_the_demo_learns_with_the_text_model_frozen(tmp_path):
    """Bug caught: frozen-text variants that learn nothing on the demo (the suite's main comparison, frozen vs
    trained text, invisible offline). freeze=text is staged's first phase (same seed, same steps), so it is read from
    there (phase/frozen_text/...) rather than trained twice; freeze=none (the vision tower trained too) is left out
    for time. Measured (README): text 66.3, vision 91.9, staged 94.8 (none 66.5), prior 23.8."""
    runs = sweep(tmp_path, "freeze", "freeze", "vision,staged")
    acc = {k: m["test/acc"] for k, m in runs.items()} | {"text": runs["staged"]["phase/frozen_text/test/acc"]}
    prior = runs["staged"]["test/prior_acc"]
    assert acc["text"] >= prior + 0.2, (acc, prior)  # frozen text learns on the demo
    assert acc["vision"] >= acc["text"] + 0.1, acc  # training the text model helps: frozen vs trained visible
    assert acc["staged"] >= acc["text"] + 0.1, acc  # unfreezing after the frozen phase adds to what it learnt
