"""Helpers the tests share (fixtures live in tests/conftest.py): the project's folders, config composition as
`python train.py` does it, `python train.py` as a subprocess, and the check that a run's test metrics are the numbers
its files imply."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from clipqa.metrics import TEST_ACC, TEST_PRIOR_ACC, TYPE_NAMES, VAL_ACC

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# A small, fast demo (conf/experiment/smoke.yaml): 1000 train / 200 test questions, tiny models, 2 epochs,
# no DataLoader workers, no tracking.
SMALL_DEMO = ["experiment=smoke"]
# The session's short demo run (the `demo_run` fixture): the smoke run's 2 epochs x 29 steps, validated every 10
# steps and at each epoch end, a resume checkpoint every 7 steps; it is also the uninterrupted reference of the crash
# and resume test (tests/training/test_resume.py).
SMALL_DEMO_RUN = [*SMALL_DEMO, "trainer.eval_every=10", "trainer.checkpoint_every=7"]
# The metrics.json keys other tools read (the sweep objective, clipqa-report, MLflow).
INTERFACE_KEYS = [TEST_ACC, VAL_ACC, TEST_PRIOR_ACC] + [f"{TEST_ACC}/{t}" for t in TYPE_NAMES.values()]


def compose_cfg(overrides: list[str], cache: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python train.py ...` would (without running Hydra's job)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cache is not None:
        with open_dict(cfg):
            cfg.paths.cache_dir = str(cache)
    return cfg


def run_cli(*args: str, cwd=None, timeout=600, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it (offline, Hydra's short error messages), output captured.
    ``env``: variables to add to (or, with None values, remove from) the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# COCO-QA's question types (types.txt codes), spelt out here rather than taken from clipqa.metrics.TYPE_NAMES.
COCOQA_TYPES = {0: "object", 1: "number", 2: "color", 3: "location"}


def _same(value, expected: float) -> bool:
    """metrics.json's number (null for NaN: a type without questions) equals the one counted by the test."""
    if math.isnan(expected):
        return value is None or math.isnan(value)
    return value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)


def check_test_metrics(run_dir: Path) -> None:
    """The run's test numbers in metrics.json are the ones its files imply, counted here independently:

    - each row of test_predictions.tsv is the test question in that place of the split files, with the type name
      of its types.txt code, and `correct` says whether prediction == answer;
    - test/acc is the fraction of correct rows, test/acc/<type> that fraction within each type, and so test/acc
      is the count-weighted mean of the four per-type accuracies;
    - test/prior_acc[/<type>] is the accuracy of answering each type's most frequent training answer (ties
      alphabetically), counted from the training questions left after the validation split.
    """
    from clipqa.data.cocoqa import read_split, train_val_split
    from clipqa.data.demo import ensure_demo

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        root = ensure_demo(cfg.paths.cache_dir, s.n_train, s.n_test, s.seed, s.image_size)  # the run's, existing
    else:
        root = Path(cfg.data.root)
    test = read_split(root, "test")
    header, *lines = (run_dir / "test_predictions.tsv").read_text().splitlines()
    assert header.split("\t") == ["image_id", "type", "question", "answer", "prediction", "correct"]
    rows = [line.split("\t") for line in lines]
    assert len(rows) == len(test) == metrics["data/n_test_evaluated"]
    expected = [
        [str(i), COCOQA_TYPES[t], q, a]
        for i, t, q, a in zip(test.image_ids, test.types, test.questions, test.answers, strict=True)
    ]
    assert [r[:4] for r in rows] == expected, "test_predictions.tsv rows are not the test split's questions"
    assert all(r[5] == str(int(r[3] == r[4])) for r in rows), "a row's `correct` disagrees with its prediction"

    correct = [r[5] == "1" for r in rows]
    assert _same(metrics["test/acc"], sum(correct) / len(rows)), (metrics["test/acc"], sum(correct) / len(rows))
    counts = Counter(r[1] for r in rows)
    for name in COCOQA_TYPES.values():
        hits = [c for c, r in zip(correct, rows, strict=True) if r[1] == name]
        acc = sum(hits) / len(hits) if hits else float("nan")
        assert _same(metrics[f"test/acc/{name}"], acc), (f"test/acc/{name}", metrics[f"test/acc/{name}"], acc)
    weighted = sum(counts[n] * metrics[f"test/acc/{n}"] for n in COCOQA_TYPES.values() if counts[n]) / len(rows)
    assert _same(metrics["test/acc"], weighted), ("count-weighted mean of test/acc/<type>", weighted)

    train, _ = train_val_split(read_split(root, "train"), cfg.data.val_fraction, cfg.data.split_seed)
    assert len(train) == metrics["data/n_train"] + metrics["data/n_train_dropped"]
    by_type: dict[int, Counter] = {}
    for answer, t in zip(train.answers, train.types, strict=True):
        by_type.setdefault(t, Counter())[answer] += 1
    prior = {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in by_type.items()}
    prior_hits = [prior.get(t) == a for t, a in zip(test.types, test.answers, strict=True)]
    assert _same(metrics["test/prior_acc"], sum(prior_hits) / len(test)), ("test/prior_acc", prior)
    for code, name in COCOQA_TYPES.items():
        hits = [h for h, t in zip(prior_hits, test.types, strict=True) if t == code]
        acc = sum(hits) / len(hits) if hits else float("nan")
        assert _same(metrics[f"test/prior_acc/{name}"], acc), (f"test/prior_acc/{name}", acc)


_MLFLOW_TEMPLATE: Path | None = None


def mlflow_store(folder: Path, name: str = "m.db") -> str:
    """The URI of a new, empty MLflow SQLite store ``folder/name``: a copy of one empty store made once per test
    process. MLflow builds a fresh store's schema by running its migrations (~1.2 s on 2 cores; the fast tier needs
    about twenty stores), and a copy is what it would have built: the same schema version, no runs. Tests of the
    store's own creation (several processes on a fresh store) do not use it."""
    global _MLFLOW_TEMPLATE
    if _MLFLOW_TEMPLATE is None:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="clipqa-mlflow-template-")) / "empty.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the schema
        _MLFLOW_TEMPLATE = template
    shutil.copyfile(_MLFLOW_TEMPLATE, folder / name)
    return f"sqlite:///{folder / name}"
