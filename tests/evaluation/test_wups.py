"""WUPS (clipqa.evaluation.wups) against values worked out by hand from WordNet 3.0's noun hierarchy, and a run
without the
WordNet data (the WUPS keys are absent, one warning says how to install it)."""

import logging
import os

import pytest

from clipqa import metrics as M
from clipqa.errors import ClipqaError
from clipqa.evaluation import wups as W


@pytest.fixture(scope="module")
def wn():
    found = W.find_wordnet(None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"no WordNet data on CI: {W.INSTALL_HINT}")
        pytest.skip(f"no WordNet data: {W.INSTALL_HINT}")
    return found


# Wu-Palmer = 2 d(lcs) / (d(a) + d(b)), depths counted in nodes from entity.n.01 (depth 1) along the shortest path.
def test_identical_words_score_one(wn):
    assert wn.score("cat", "cat", 0.9) == wn.score("cat", "cat", 0.0) == 1.0
    assert wn.score("xyzzy", "xyzzy", 0.9) == 1.0  # identical, even outside WordNet (Malinowski: a == b first)


def test_a_hypernym_pair_above_the_threshold_counts_in_full(wn):
    # kitchen.n.01 -> room.n.01 (room: entity > physical_entity > object > whole > artifact > structure > area >
    # room, depth 8; kitchen one below, depth 9): 2*8 / (9 + 8) = 16/17 = 0.941 >= 0.9; room's other senses score
    # at most 0.14
    assert wn.similarity("kitchen", "room") == pytest.approx(16 / 17)
    assert wn.score("kitchen", "room", 0.9) == pytest.approx(16 / 17)
    assert wn.score("room", "kitchen", 0.0) == pytest.approx(16 / 17)


def test_a_hypernym_pair_below_the_threshold_is_down_weighted(wn):
    # sofa.n.01 -> seat.n.03 -> furniture.n.01 (depth 8; sofa depth 10): 2*8 / (10 + 8) = 8/9 = 0.889 < 0.9
    assert wn.similarity("sofa", "furniture") == pytest.approx(8 / 9)
    assert wn.score("sofa", "furniture", 0.9) == pytest.approx(0.1 * 8 / 9)
    assert wn.score("sofa", "furniture", 0.0) == pytest.approx(8 / 9)


def test_unrelated_words_below_the_threshold_get_a_tenth(wn):
    # giraffe.n.01 (depth 15) and sofa.n.01 (depth 10) meet at whole.n.02 (depth 4): 2*4 / (15 + 10) = 8/25
    assert wn.similarity("giraffe", "sofa") == pytest.approx(8 / 25)
    assert wn.score("giraffe", "sofa", 0.9) == pytest.approx(0.1 * 8 / 25)
    assert wn.score("giraffe", "sofa", 0.0) == pytest.approx(8 / 25)


def test_a_word_not_in_wordnet_scores_zero(wn):
    assert wn.similarity("xyzzy", "dog") == 0.0
    assert wn.score("xyzzy", "dog", 0.0) == 0.0 and wn.score("##s", "dog", 0.9) == 0.0  # a stray wordpiece


def test_split_scores_are_means_overall_and_per_type(wn):
    preds = ["cat", "sofa", "giraffe", "xyzzy"]
    truth = ["cat", "furniture", "sofa", "two"]
    types = [0, 0, 2, 1]
    out = wn.by_type(preds, truth, types)
    assert set(out) == {
        M.wups_key(th) + s for th in (0.9, 0.0) for s in ["", "/object", "/number", "/color", "/location"]
    }
    assert out["test/wups_0.9"] == pytest.approx((1 + 0.8 / 9 + 0.8 / 25 + 0) / 4)
    assert out["test/wups_0.0"] == pytest.approx((1 + 8 / 9 + 8 / 25 + 0) / 4)
    assert out["test/wups_0.9/object"] == pytest.approx((1 + 0.8 / 9) / 2)
    assert out["test/wups_0.0/number"] == 0.0 and out["test/wups_0.0/color"] == pytest.approx(8 / 25)
    assert out["test/wups_0.9/location"] != out["test/wups_0.9/location"]  # no location question: NaN


def test_without_wordnet_data_the_keys_are_absent_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(W, "_load", lambda folder: None)  # as on a machine with neither nltk's data nor Debian's
    monkeypatch.setattr(W, "_warned", False)

    class Split:
        answers, types = ["cat"], [0]

    with caplog.at_level(logging.WARNING, logger="clipqa.evaluation.wups"):
        assert W.split_wups(None, Split, {0: 0}, ["cat"]) == {}
        assert W.split_wups(None, Split, {0: 0}, ["cat"]) == {}
    warnings = [r.getMessage() for r in caplog.records if "WUPS" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install wordnet-base" in warnings[0]


def test_a_wordnet_folder_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(ClipqaError, match=r"paths.wordnet=.*no data.noun"):
        W.find_wordnet(str(tmp_path))
