"""A table of corrupted datasets and images, each run through the real pipeline (train() on the tiny preset).

Every case must end in either a ClipqaError naming the file (and line, for text files), or - with
data.on_bad_image=skip - a finished run that logged how many questions it skipped. Never a hang, a raw traceback
or a silently different dataset.
"""

from pathlib import Path

import pytest
from PIL import Image

from clipqa.data.cocoqa import read_split
from clipqa.errors import ClipqaError
from clipqa.training.run import train
from tests.helpers.handmade import make_cocoqa
from tests.helpers.runs import SMALL_DEMO, compose_cfg


def first_image(root: Path, images: Path, split: str = "test") -> Path:
    image_id = int((root / split / "img_ids.txt").read_text().split()[0])
    folder = "val2014" if split == "test" else "train2014"
    return images / folder / f"COCO_{folder}_{image_id:012d}.jpg"


def lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


def write_lines(p: Path, rows: list[str]) -> None:
    p.write_text("\n".join(rows) + "\n")


def empty_files(root, images):
    for f in ("img_ids", "questions", "answers", "types"):
        (root / "test" / f"{f}.txt").write_text("")
    return root / "test" / "questions.txt", None


def one_empty_file(root, images):
    (root / "test" / "answers.txt").write_text("")
    return root / "test" / "answers.txt", None


def non_utf8(root, images):
    p = root / "train" / "questions.txt"
    p.write_bytes(p.read_bytes().replace(b"what", b"wh\xffat", 1))
    return p, None


def mismatched_counts(root, images):
    p = root / "test" / "types.txt"
    write_lines(p, lines(p)[:-1])
    return p, None


def unknown_type(root, images):
    p = root / "train" / "types.txt"
    rows = lines(p)
    rows[2] = "9"
    write_lines(p, rows)
    return p, "line 3"


def bad_image_id(root, images):
    p = root / "test" / "img_ids.txt"
    rows = lines(p)
    rows[1] = "abc"
    write_lines(p, rows)
    return p, "line 2"


def blank_question(root, images):
    p = root / "train" / "questions.txt"
    rows = lines(p)
    rows[4] = ""
    write_lines(p, rows)
    return p, "line 5"


def missing_image(root, images):
    p = first_image(root, images)
    p.unlink()
    return Path(p.name), None


def truncated_jpeg(root, images):
    p = first_image(root, images)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(p, format="JPEG")
    p.write_bytes(p.read_bytes()[:300])
    return p, None


def zero_byte_image(root, images):
    p = first_image(root, images)
    p.write_bytes(b"")
    return p, None


def huge_image(root, images, monkeypatch=None):
    p = first_image(root, images)
    Image.new("L", (3000, 3000)).save(p, format="JPEG")  # over the lowered decompression-bomb limit below
    return p, None


CASES = {
    "empty-files": (empty_files, "error"),
    "one-empty-file": (one_empty_file, "error"),
    "non-utf8-bytes": (non_utf8, "error"),
    "mismatched-line-counts": (mismatched_counts, "error"),
    "unknown-type-code": (unknown_type, "error"),
    "non-integer-image-id": (bad_image_id, "error"),
    "blank-question": (blank_question, "error"),
    "missing-image": (missing_image, "error"),
    "missing-image-skip": (missing_image, "skip"),
    "truncated-jpeg": (truncated_jpeg, "error"),
    "truncated-jpeg-skip": (truncated_jpeg, "skip"),
    "zero-byte-image": (zero_byte_image, "error"),
    "zero-byte-image-skip": (zero_byte_image, "skip"),
    "huge-image": (huge_image, "error"),
    # Runs with a frozen vision tower read images through the feature cache; these two go the per-batch way.
    "truncated-jpeg-uncached": (truncated_jpeg, "error", "features.cache=false"),
    "truncated-jpeg-skip-uncached": (truncated_jpeg, "skip", "features.cache=false"),
}


# ~5 s each (a whole short run that skips): the slow tier; the fast tier keeps truncated-jpeg-skip for the policy.
SLOW_CASES = {"missing-image-skip", "zero-byte-image-skip", "truncated-jpeg-uncached"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES], ids=list(CASES)
)
def test_bad_input_corpus(case, tmp_path, cache_dir, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # so a 3000x3000 picture counts as a bomb
    mutate, policy, *extra = CASES[case]
    root, images = make_cocoqa(tmp_path, n_train_images=16, n_test_images=6)
    n_test = len(read_split(root, "test"))
    named, where = mutate(root, images)
    cfg = compose_cfg(
        [
            f"data.root={root}",
            f"data.image_root={images}",
            f"data.on_bad_image={policy}",
            "backbone=tiny",
            "backbone.tiny.image_size=32",
            "trainer.max_steps=1",
            "trainer.num_workers=0",
            "trainer.batch_size=8",
            "tracking=none",
            "trainer.save_checkpoint=false",
            *extra,
        ],
        cache_dir,
    )
    if policy == "error":
        with pytest.raises(ClipqaError) as e:
            train(cfg, tmp_path / "run")
        assert str(named) in str(e.value)
        if where:
            assert where in str(e.value)
    else:
        metrics = train(cfg, tmp_path / "run")
        assert "skipped" in caplog.text and str(named) in caplog.text
        if "missing" in case:  # dropped up front: both questions on that image, counted in data/n_test
            assert metrics["data/n_test"] == n_test - 2 == metrics["data/n_test_evaluated"]
        else:  # unreadable at load time: skipped while evaluating, counted in data/n_test_evaluated
            assert metrics["data/n_test_evaluated"] == metrics["data/n_test"] - 2 == n_test - 2


@pytest.mark.parametrize("which", ["run-folder", "cache-folder"])
def test_unwritable_output_or_cache_folder_fails_up_front_naming_it(which, tmp_path, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "sub"
    cfg = compose_cfg(SMALL_DEMO, bad if which == "cache-folder" else cache_dir)
    with pytest.raises(ClipqaError) as e:
        train(cfg, bad if which == "run-folder" else tmp_path / "run")
    assert str(bad) in str(e.value)
    assert ("paths.cache_dir" if which == "cache-folder" else "hydra.run.dir") in str(e.value)
