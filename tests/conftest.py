"""Shared fixtures: offline mode, one cache folder per test session, and config composition helpers."""

import os

# Before transformers/huggingface_hub are imported: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A small, fast demo (conf/experiment/smoke.yaml): 1000 train / 200 test questions, tiny models, 2 epochs,
# no DataLoader workers, no tracking.
SMALL_DEMO = ["experiment=smoke"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder (demo data, tiny backbones) shared by the whole session; also used by subprocesses.

    Also points MLflow's default store at a session folder, so no test writes to the project's mlflow.db.
    """
    d = tmp_path_factory.mktemp("clipqa-cache")
    os.environ["CLIPQA_CACHE_DIR"] = str(d)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'session-mlflow.db'}"
    return d


def compose_cfg(overrides: list[str], cache: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python train.py ...` would (without running Hydra's job)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cache is not None:
        with open_dict(cfg):
            cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture
def small_demo_cfg(cache_dir):
    def make(*extra: str) -> DictConfig:
        return compose_cfg([*SMALL_DEMO, *extra], cache_dir)

    return make
