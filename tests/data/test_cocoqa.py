"""The COCO-QA reader, image lookup, splits, labels, batching, and the errors users see for bad data; short training
runs on a hand-made folder in the real COCO-QA and COCO layout."""

import json
from pathlib import Path

import pytest
from PIL import Image

from clipqa.data.cocoqa import (
    Collator,
    LabelSpace,
    QADataset,
    attach_images,
    index_images,
    read_split,
    train_val_split,
)
from clipqa.errors import ClipqaError
from clipqa.models.tiny_backbone import train_wordpiece
from clipqa.training.run import train
from tests.helpers.handmade import make_cocoqa
from tests.helpers.runs import INTERFACE_KEYS, compose_cfg


@pytest.fixture
def handmade(tmp_path) -> tuple[Path, Path]:
    return make_cocoqa(tmp_path, n_train_images=12, n_test_images=4)


def test_reads_the_archive_layout_and_finds_images_in_both_coco_folders(handmade):
    root, images = handmade
    train, test = read_split(root, "train"), read_split(root, "test")
    assert (len(train), len(test)) == (24, 8)
    assert set(train.types) == {0, 1, 2, 3}
    index = index_images(images)
    assert index[train.image_ids[0]].parent.name == "train2014"
    assert index[test.image_ids[0]].parent.name == "val2014"
    assert len(attach_images(test, index, images, "error")) == 8


def test_missing_data_folder_says_where_it_looked_what_to_download_and_how_to_run_the_demo(tmp_path):
    with pytest.raises(ClipqaError) as e:
        read_split(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "train") in msg
    assert "questions.txt" in msg and "cocoqa-2015-05-17.zip" in msg and "train2014.zip" in msg
    assert "experiment=demo" in msg
    with pytest.raises(ClipqaError) as e:
        index_images(tmp_path / "no-images")
    assert "train2014" in str(e.value) and "data.image_root" in str(e.value)


def test_incomplete_split_names_the_missing_file(handmade):
    root, _ = handmade
    (root / "test" / "types.txt").unlink()
    with pytest.raises(ClipqaError, match="missing types.txt"):
        read_split(root, "test")


def test_line_count_mismatch_names_each_file_and_its_count(handmade):
    root, _ = handmade
    answers = root / "train" / "answers.txt"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[:-3]))
    with pytest.raises(ClipqaError) as e:
        read_split(root, "train")
    msg = str(e.value)
    assert f"{answers}: 21 lines" in msg and f"{root / 'train' / 'questions.txt'}: 24 lines" in msg


def test_unknown_type_code_names_file_and_line(handmade):
    root, _ = handmade
    types = root / "train" / "types.txt"
    lines = types.read_text().splitlines()
    lines[4] = "7"
    types.write_text("\n".join(lines) + "\n")
    with pytest.raises(ClipqaError) as e:
        read_split(root, "train")
    assert f"{types} line 5" in str(e.value) and "'7'" in str(e.value)


def test_crlf_and_trailing_blank_lines_are_read_as_the_same_questions(handmade):
    root, _ = handmade
    before = read_split(root, "test")
    for name in ("img_ids", "questions", "answers", "types"):
        p = root / "test" / f"{name}.txt"
        p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n") + b"\r\n\r\n")
    after = read_split(root, "test")
    assert after.questions == before.questions and after.types == before.types


def test_missing_image_errors_by_default_and_is_counted_and_logged_with_skip(handmade, caplog):
    root, images = handmade
    test = read_split(root, "test")
    victim = images / "val2014" / f"COCO_val2014_{test.image_ids[0]:012d}.jpg"
    victim.unlink()
    index = index_images(images)
    with pytest.raises(ClipqaError) as e:
        attach_images(test, index, images, "error")
    assert victim.name in str(e.value) and "data.on_bad_image=skip" in str(e.value)
    kept = attach_images(test, index, images, "skip")
    assert len(kept) == len(test) - 2  # that image had two questions
    assert "skipped 2 test questions" in caplog.text


def test_unreadable_image_is_named(handmade, caplog):
    root, images = handmade
    test = read_split(root, "test")
    index = index_images(images)
    bad = index[test.image_ids[0]]
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    processor = _processor()
    ds = QADataset(test, [0] * len(test), index, processor, "error")
    with pytest.raises(ClipqaError) as e:
        ds[0]
    assert str(bad) in str(e.value)
    skipping = QADataset(test, [0] * len(test), index, processor, "skip")
    assert skipping[0] is None and str(bad) in caplog.text
    assert skipping[2] is not None


def test_greyscale_cmyk_and_png_with_alpha_images_load_as_rgb(handmade):
    root, images = handmade
    train = read_split(root, "train")
    index = index_images(images)
    ds = QADataset(train, [0] * len(train), index, _processor(), "error")
    modes = {Image.open(index[train.image_ids[i]]).mode for i in range(0, 8, 2)}
    assert {"L", "CMYK", "RGBA", "RGB"} <= modes
    for i in range(0, 8, 2):
        assert ds[i]["pixel_values"].shape == (3, 32, 32)


def test_validation_split_is_seeded_and_ten_percent(handmade):
    train = read_split(handmade[0], "train")
    a_train, a_val = train_val_split(train, 0.25, seed=42)
    b_train, b_val = train_val_split(train, 0.25, seed=42)
    _, c_val = train_val_split(train, 0.25, seed=43)
    assert a_val.questions == b_val.questions and len(a_val) == 6 and len(a_train) == 18
    assert a_val.questions != c_val.questions
    val_pairs = set(zip(a_val.image_ids, a_val.questions, strict=True))
    assert not val_pairs & set(zip(a_train.image_ids, a_train.questions, strict=True))


def test_questions_are_padded_per_batch_not_to_63():
    tok = train_wordpiece(["what color is the circle in the big kitchen", "how many", "red"], 200)
    collate = Collator(tok, max_tokens=64)
    item = {"pixel_values": _pixels(), "label": 1, "type": 0, "index": 0}
    batch = collate([{**item, "question": "how many"}, {**item, "question": "what color is the circle"}])
    assert batch["input_ids"].shape == (2, 7)  # [CLS] what color is the circle [SEP]
    assert batch["attention_mask"].sum(1).tolist() == [4, 7]


def test_vocab_labels_need_exactly_one_known_wordpiece_and_answers_head_keeps_train_answers():
    tok = train_wordpiece(["ab ba", "ab a b"], 9)  # alphabet only: "ab" is two pieces (a ##b), "z" is [UNK]
    vocab = LabelSpace.build("vocab", tok, ["a", "ab", "z"])
    a, ab, z = vocab.labels(["a", "ab", "z"])
    assert a >= 0 and vocab.classes[a] == "a"
    assert ab == -1 and z == -1
    answers = LabelSpace.build("answers", tok, ["ab", "z", "ab"])
    assert answers.classes == ["ab", "z"]
    assert answers.labels(["z", "unseen"]) == [1, -1]


# ~6 s (a short run): slow; the fast tier trains on such a folder in tests/data/test_bad_input_corpus.py
@pytest.mark.slow
def test_trains_on_a_hand_made_folder_in_the_real_cocoqa_and_coco_layout(tmp_path, cache_dir):
    data_root, image_root = make_cocoqa(tmp_path, n_train_images=40, n_test_images=12)
    cfg = compose_cfg(
        [
            f"data.root={data_root}",
            f"data.image_root={image_root}",
            "backbone=tiny",
            "backbone.tiny.image_size=32",
            "mapper.hidden_dim=32",
            "head=answers",
            "head.readout=last",
            "trainer.batch_size=16",
            "trainer.epochs=1",
            "trainer.num_workers=1",
            "optimizer=adamw",
            "optimizer.lr=1e-3",
        ],
        cache_dir,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["data/n_test"] == 24 and metrics["data/n_train"] + metrics["data/n_val"] == 80
    assert metrics["params/frozen/text"] > 0 and metrics["params/trainable/text"] == 0  # freeze=text default
    assert set(INTERFACE_KEYS) <= set(json.loads((tmp_path / "run" / "metrics.json").read_text()))


def test_vocab_head_drops_and_counts_multi_wordpiece_training_answers(tmp_path, cache_dir, caplog):
    data_root, image_root = make_cocoqa(tmp_path, n_train_images=20, n_test_images=4)
    answers = data_root / "train" / "answers.txt"
    lines = answers.read_text().splitlines()
    lines[:3] = ["xylophonequartz"] * 3  # too rare for the tiny WordPiece vocabulary to hold as one piece
    answers.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg(
        [
            f"data.root={data_root}",
            f"data.image_root={image_root}",
            "backbone=tiny",
            "backbone.tiny.image_size=32",
            "backbone.tiny.vocab_size=120",
            "trainer.max_steps=2",
            "trainer.num_workers=0",
            "data.val_fraction=0.05",
            "trainer.save_checkpoint=false",
        ],
        cache_dir,
    )
    metrics = train(cfg, tmp_path / "run")
    assert metrics["data/n_train_dropped"] >= 1
    assert "not one wordpiece" in caplog.text


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _pixels():
    import torch

    return torch.zeros(3, 32, 32)
