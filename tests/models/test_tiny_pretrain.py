"""The demo's pretrained tiny backbones (backbone=tiny_pretrained, clipqa/models/tiny_pretrain.py): built
reproducibly, so
the feature cache's key (a digest of the vision weights) is the same on every build, and independent of the run's
data, so the demo and the smoke test share one build."""

import pytest
import torch

from clipqa.models.backbones import load_sources, weights_digest
from clipqa.models.tiny_backbone import build_tiny
from tests.helpers.runs import compose_cfg

# The full pretraining's code path with fewer steps, so that building twice stays a fast-tier test.
SHORT = [
    "backbone=tiny_pretrained",
    "backbone.tiny.pretrain.documents=200",
    "backbone.tiny.pretrain.pictures=64",
    "backbone.tiny.pretrain.text_steps=15",
    "backbone.tiny.pretrain.vision_steps=15",
    "backbone.tiny.pretrain.batch_size=16",
    "data.root=x",
    "data.image_root=y",
]


def digests(folder) -> tuple[str, str, bytes]:
    b = load_sources(str(folder / "vision"), str(folder / "text"))
    return weights_digest(b.vision), weights_digest(b.text), (folder / "text" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_the_pretrained_backbone_builds_bit_identically_whatever_the_thread_count(tmp_path):
    """Bug caught: a build that depends on the machine's load or thread count (multi-threaded sums round
    differently) or on leftover RNG state would give the vision tower a new digest, and so every run a new
    feature-cache key: the cache is rebuilt instead of reused."""
    tcfg = compose_cfg(SHORT).backbone.tiny
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_rng = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny(tcfg, tmp_path / "a", None)
    assert torch.rand(1) == expected_rng and torch.get_num_threads() == threads  # the caller's state is left alone
    torch.rand(5)  # another RNG state and thread count for the second build
    torch.set_num_threads(max(2, threads))
    try:
        b = build_tiny(tcfg, tmp_path / "b", ["other", "training", "text"])  # the run's data does not matter
    finally:
        torch.set_num_threads(threads)
    assert a.name == b.name  # the same cache key
    assert digests(a) == digests(b)


@pytest.mark.slow
def test_another_pretraining_seed_gives_other_weights_and_another_key(tmp_path):
    """Bug caught: a pretraining setting missing from the cache key would serve stale weights after a change."""
    a = build_tiny(compose_cfg(SHORT).backbone.tiny, tmp_path, None)
    b = build_tiny(compose_cfg([*SHORT, "backbone.tiny.pretrain.seed=7"]).backbone.tiny, tmp_path, None)
    assert a != b and digests(a)[0] != digests(b)[0]
