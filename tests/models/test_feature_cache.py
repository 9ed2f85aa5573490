"""The frozen-feature cache: same results as without it, a key that covers every input, safe builds, the CLI."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipqa import cli
from clipqa.errors import ClipqaError
from clipqa.models import feature_cache as features
from clipqa.models.image_tokens import select_tokens
from clipqa.training.run import train
from tests.helpers.runs import ROOT, SMALL_DEMO, check_test_metrics, compose_cfg

# A smaller demo still: the cache tests train twice or start several processes.
TINY_RUN = [*SMALL_DEMO, "data.synthetic.n_train=600", "data.synthetic.n_test=100"]


def test_select_tokens_all_cls_and_pooled_shapes_and_values():
    hidden = torch.randn(2, 1 + 16, 8)  # CLS + a 4x4 patch grid
    assert select_tokens(hidden, "all", None).shape == (2, 17, 8)
    assert torch.equal(select_tokens(hidden, "cls", None), hidden[:, :1])
    pooled = select_tokens(hidden, "pooled", 4)  # 4x4 grid -> 2x2 grid
    assert pooled.shape == (2, 4, 8)
    grid = hidden[:, 1:].reshape(2, 4, 4, 8)  # row-major patches
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)  # top-left quadrant
    assert torch.allclose(pooled[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)), atol=1e-6)  # bottom-right


@pytest.mark.slow  # a full extra training run (fast tier <= 2 minutes)
def test_cached_and_uncached_training_give_the_same_metrics(tmp_path, cache_dir, caplog):
    caplog.set_level("INFO")
    runs = {}
    for cache in ("true", "false"):
        cfg = compose_cfg([*SMALL_DEMO, f"features.cache={cache}"], cache_dir)
        runs[cache] = train(cfg, tmp_path / cache)
    assert "feature cache" in caplog.text
    with_cache, without = runs["true"], runs["false"]
    for key in ("test/acc", "val/acc", "test/acc/object", "test/acc/color", "best_step"):
        assert with_cache[key] == pytest.approx(without[key], abs=0.011), key  # float order: at most one answer
    losses = [
        [json.loads(line).get("train/loss") for line in (tmp_path / c / "history.jsonl").read_text().splitlines()]
        for c in ("true", "false")
    ]
    pairs = [(a, b) for a, b in zip(*losses, strict=True) if a is not None]
    assert pairs and all(math.isclose(a, b, rel_tol=1e-3) for a, b in pairs)
    assert with_cache["test/acc"] > with_cache["test/prior_acc"]  # and it learned something


def _store_inputs(cache_dir, tmp_path):
    """A tiny vision tower + processor and a few image files, as the key sees them."""
    from clipqa.models.backbones import load_sources

    tiny = sorted((Path(cache_dir) / "tiny-backbone").glob("*/vision"))
    if not tiny:  # build one through a short run
        train(compose_cfg([*TINY_RUN, "trainer.max_steps=1"], cache_dir), tmp_path / "seed-run")
        tiny = sorted((Path(cache_dir) / "tiny-backbone").glob("*/vision"))
    b = load_sources(str(tiny[0]), str(tiny[0].parent / "text"))
    from PIL import Image

    paths = {}
    for i in range(6):
        paths[i] = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (40, 30), (40 * i, 20, 200 - 30 * i)).save(paths[i])
    return b, paths


def _key(b, paths, select="all", k=None, dtype="fp16"):
    return features.store_key(
        features.describe(b.vision, b.image_processor, select, k, dtype), features.image_fingerprints(paths)
    )


def test_the_key_changes_with_every_input_the_features_depend_on(tmp_path, cache_dir):
    b, paths = _store_inputs(cache_dir, tmp_path)
    base = _key(b, paths)
    assert _key(b, paths) == base  # deterministic
    assert _key(b, paths, "cls") != base
    assert _key(b, paths, "pooled", 4) != _key(b, paths, "pooled", 16)
    assert _key(b, paths, dtype="fp32") != base
    b.image_processor.crop_size = {"height": 30, "width": 30}  # another pre-processing
    assert _key(b, paths) != base
    b.image_processor.crop_size = {"height": b.vision.config.image_size, "width": b.vision.config.image_size}
    with torch.no_grad():
        next(b.vision.parameters())[0].add_(1e-3)  # other weights under the same name
    assert _key(b, paths) != base
    with torch.no_grad():
        next(b.vision.parameters())[0].sub_(1e-3)
    before = _key(b, paths)
    paths[3].write_bytes(paths[3].read_bytes() + b"\0")  # an edited image
    assert _key(b, paths) != before
    fewer = {i: p for i, p in paths.items() if i != 5}
    assert _key(b, fewer) != _key(b, paths)  # another image set


def _ensure(b, paths, folder, **kw):
    args = dict(
        vision=b.vision,
        processor=b.image_processor,
        paths=paths,
        users={i: f"question {i + 1} of the train split" for i in paths},
        select="all",
        k=None,
        dtype="fp16",
        folder=folder,
        device=torch.device("cpu"),
        batch_size=2,
        num_workers=0,
        on_bad_image="error",
    )
    return features.ensure_store(**{**args, **kw})


def test_an_interrupted_build_never_looks_complete_and_the_next_build_finishes(tmp_path, cache_dir, monkeypatch):
    b, paths = _store_inputs(cache_dir, tmp_path)
    folder = tmp_path / "features"
    real_forward, calls = b.vision.forward, {"n": 0}

    def dies_on_second_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real_forward(*a, **kw)

    monkeypatch.setattr(b.vision, "forward", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _ensure(b, paths, folder)
    key = _key(b, paths)
    assert not (folder / key).exists()  # no store that could be mistaken for a finished one
    assert not list(folder.glob(f"{key}.tmp-*"))  # and the half-written rows were removed
    (folder / f"{key}.tmp-99999999").mkdir()  # what a SIGKILLed build leaves behind
    monkeypatch.setattr(b.vision, "forward", real_forward)
    store = _ensure(b, paths, folder)
    assert store.folder == folder / key and not list(folder.glob(f"{key}.tmp-*"))  # the leftover is cleaned
    with torch.no_grad():  # the stored rows are the tower's features of each image, rounded to fp16
        from clipqa.data.cocoqa import load_pixels

        px = load_pixels(paths[4], b.image_processor, "error", "test")[0].unsqueeze(0)
        expected = b.vision(pixel_values=px).last_hidden_state[0].half()
    assert torch.equal(store[4], expected)


def test_a_build_decoding_in_one_worker_per_core_stores_the_same_rows(tmp_path, cache_dir, monkeypatch):
    """features.num_workers=null decodes in one worker process per usable core (the build's bottleneck once CLIP
    runs on a GPU) and stores exactly what a build in the main process stores. Catches None reaching the
    DataLoader, or rows written out of order by parallel workers."""
    b, paths = _store_inputs(cache_dir, tmp_path)
    seen = []
    real_loader = features.DataLoader
    monkeypatch.setattr(
        features, "DataLoader", lambda *a, **kw: seen.append(kw["num_workers"]) or real_loader(*a, **kw)
    )
    monkeypatch.setattr(features.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parallel = _ensure(b, paths, tmp_path / "parallel", num_workers=None)
    serial = _ensure(b, paths, tmp_path / "serial", num_workers=0)
    assert seen == [2, 0]
    assert all(torch.equal(parallel[i], serial[i]) for i in paths)


def test_an_unreadable_image_fails_the_build_naming_file_and_question(tmp_path, cache_dir):
    b, paths = _store_inputs(cache_dir, tmp_path)
    paths[2].write_bytes(paths[2].read_bytes()[:40])  # truncated JPEG
    with pytest.raises(ClipqaError, match="img2.jpg.*question 3 of the train split"):
        _ensure(b, paths, tmp_path / "features")
    store = _ensure(b, paths, tmp_path / "features", on_bad_image="skip")
    assert 2 not in store and 1 in store and set(store.bad) == {2}


@pytest.mark.slow
def test_several_processes_starting_at_once_share_one_build(tmp_path, cache_dir):
    """Three sweep jobs start while a build holds the lock: all wait; then one encodes and the others reuse it."""
    from filelock import FileLock

    from clipqa.config import validate
    from clipqa.models.backbones import load_backbone
    from clipqa.training.loaders import images_of, load_data

    overrides = [*TINY_RUN, f"features.dir={tmp_path / 'features'}", "features.num_workers=0"]
    cfg = validate(compose_cfg(overrides, cache_dir))
    train_split, val_split, test_split, index = load_data(cfg)  # also builds the demo data and tiny backbone
    b = load_backbone(cfg.backbone, cfg.paths.cache_dir, train_split.questions + train_split.answers)
    paths, _ = images_of([train_split, val_split, test_split], index)
    key = features.store_key(
        features.describe(b.vision, b.image_processor, "all", None, "fp16"), features.image_fingerprints(paths)
    )
    (tmp_path / "features").mkdir()
    lock = FileLock(str(tmp_path / "features" / f"{key}.lock"))
    lock.acquire()  # as if another job were half-way through building this very store
    env = {**os.environ, "CLIPQA_CACHE_DIR": str(cache_dir)}
    logs = [tmp_path / f"job{i}.log" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "clipqa.cli", "cache", *overrides],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        for f in (open(log, "w") for log in logs)
    ]
    try:
        deadline = time.time() + 240
        while not all("waiting for it" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [x.read_text() for x in logs]
            time.sleep(0.5)
        assert not (tmp_path / "features" / key).exists()  # nobody built past the lock
    finally:
        lock.release()
    for p in procs:
        p.wait(timeout=240)
    outs = [log.read_text() for log in logs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("feature cache built:" in o for o in outs) == 1, outs  # exactly one process encoded the images
    assert sum("built by another process" in o for o in outs) == 2, outs  # the other two reused its store
    assert all(f"feature cache: {tmp_path / 'features' / key}" in o for o in outs)
    assert [d.name for d in (tmp_path / "features").iterdir() if d.is_dir()] == [key]


def test_the_cache_is_bypassed_when_the_vision_tower_trains(tmp_path, cache_dir, caplog):
    caplog.set_level("INFO")
    folder = tmp_path / "features"
    cfg = compose_cfg([*TINY_RUN, "freeze=none", "trainer.max_steps=2", f"features.dir={folder}"], cache_dir)
    train(cfg, tmp_path / "run")
    assert "feature cache bypassed" in caplog.text
    assert not folder.exists()


def test_clipqa_cache_command_builds_then_reuses_and_reports_the_size(tmp_path, cache_dir, capsys):
    args = [*TINY_RUN, "image_tokens=cls", f"features.dir={tmp_path / 'f'}"]
    cli.cache(args)
    first = capsys.readouterr().out
    assert "feature cache:" in first and "MiB" in first and "1 tokens x 64" in first
    cli.cache(args)
    assert capsys.readouterr().out.splitlines()[0] == first.splitlines()[0]  # the same store, found again
    assert len([d for d in (tmp_path / "f").iterdir() if d.is_dir()]) == 1


def test_clipqa_cache_refuses_a_config_that_trains_the_vision_tower(tmp_path, cache_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.cache([*TINY_RUN, "freeze=none", f"features.dir={tmp_path / 'f'}"])
    assert exit_.value.code == 2 and "trains the vision tower" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["image_tokens=cls", "image_tokens=pooled"])
def test_fewer_image_tokens_train_and_shrink_the_cache(tokens, tmp_path, cache_dir):
    folder = tmp_path / "features"
    cfg = compose_cfg([*TINY_RUN, tokens, "trainer.max_steps=5", f"features.dir={folder}"], cache_dir)
    train(cfg, tmp_path / "run")
    check_test_metrics(tmp_path / "run")  # trained and tested on the fewer tokens: its numbers add up
    (store,) = [d for d in folder.iterdir() if d.is_dir()]
    n_tokens = json.loads((store / "index.json").read_text())["description"]["image_tokens"]
    assert features.FeatureStore(store).shape[0] == (1 if tokens.endswith("cls") else 4), n_tokens
