"""The tests' fixtures: offline mode, one cache folder per test session, a small demo config, one short demo run
shared by the session, a real SLURM cluster and a real PostgreSQL server. Helpers (config composition, `python
train.py` as a subprocess, metric checks) are in tests/helpers/."""

import os

# Before transformers/huggingface_hub are imported: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.helpers.runs import SMALL_DEMO, SMALL_DEMO_RUN, compose_cfg  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder (demo data, tiny backbones) shared by the whole session; also used by subprocesses.

    Also points MLflow's default store at a session folder, so no test writes to the project's mlflow.db.

    Tiny backbones already built in the user's cache (``$CLIPQA_CACHE_DIR`` or ``~/.cache/clipqa``: by the demo, or
    by ``.ci/run``'s smoke run) are copied in, so a session does not pay the pretrained preset's ~40 s build again.
    Safe to share: each is a finished build (written to a temp folder, then renamed) under a key that hashes its
    config and the pretraining code's version. ``tests/models/test_tiny_pretrain.py`` builds its own, from nothing.
    """
    d = tmp_path_factory.mktemp("clipqa-cache")
    user_cache = Path(os.environ.get("CLIPQA_CACHE_DIR") or "~/.cache/clipqa").expanduser() / "tiny-backbone"
    for built in user_cache.glob("*/text/config.json") if user_cache.is_dir() else ():
        key = built.parent.parent
        if ".tmp-" not in key.name:
            shutil.copytree(key, d / "tiny-backbone" / key.name)
    os.environ["CLIPQA_CACHE_DIR"] = str(d)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'session-mlflow.db'}"
    return d


@pytest.fixture
def small_demo_cfg(cache_dir):
    def make(*extra: str) -> DictConfig:
        return compose_cfg([*SMALL_DEMO, *extra], cache_dir)

    return make


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, cache_dir) -> tuple[DictConfig, Path, dict]:
    """One short demo run (SMALL_DEMO_RUN: 2 epochs x 29 steps, about 10 s on 2 cores) for the whole session:
    (its config, its run folder, the metrics train() returned). Shared by the tests of the files a run leaves
    (tests/training/test_run.py), of its best.pt (tests/training/test_checkpoint.py), of the tools that use a
    trained model (tests/inference/test_trained.py), and the uninterrupted reference of the crash and resume test
    (tests/training/test_resume.py). Read it, never write into its folder."""
    from clipqa.training.run import train

    out = tmp_path_factory.mktemp("demo-run")
    cfg = compose_cfg(SMALL_DEMO_RUN, cache_dir)
    return cfg, out, train(cfg, out)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster for the session's SLURM tests (tests/helpers/slurm_cluster.py: its own slurm.conf
    via
    SLURM_CONF, ports, state and logs in a temp folder; munged started if not running). Skipped, with the reason,
    where SLURM is not installed; an error instead where CLIPQA_REQUIRE_SLURM=1 (.ci/run sets it)."""
    from tests.helpers.slurm_cluster import PACKAGES, missing_programs, start_cluster

    if missing := missing_programs():
        reason = f"SLURM is not installed ({', '.join(missing)} missing): apt-get install {PACKAGES}"
        if os.environ.get("CLIPQA_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session's shared-services tests (tests/helpers/postgres.py: initdb + pg_ctl in
    a temp
    folder, 127.0.0.1 and a port of its own, a password-protected superuser). ``postgres.create_database(name)``
    returns a SQLAlchemy URL. Skipped where PostgreSQL is not installed; an error instead where
    CLIPQA_REQUIRE_POSTGRES=1 (.ci/run sets it)."""
    from tests.helpers.postgres import PACKAGE, bin_dir, start_postgres

    if bin_dir() is None:
        reason = f"PostgreSQL is not installed: apt-get install {PACKAGE}"
        if os.environ.get("CLIPQA_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    server = start_postgres()
    yield server
    server.stop()
