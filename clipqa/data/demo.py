"""The embedded demo dataset: synthetic pictures and questions written in exactly the COCO-QA archive layout.

Each picture shows 1-4 shapes of one kind and one colour on a background that stands for a place; each picture
gets questions of the four COCO-QA types, answerable only by looking at it:

    object   "what is the red object in the kitchen"  -> circle | square | triangle | diamond
    number   "how many triangles are there"           -> one | two | three | four
    color    "what color is the square"               -> red | green | blue | yellow | purple
    location "where are the diamonds"                 -> beach | field | kitchen | street

Answers are drawn uniformly, so the answer prior is about 25% and a model has to read the picture to beat it.
Output (deterministic for a seed)::

    <root>/train/{img_ids,questions,answers,types}.txt     <root>/images/train2014/COCO_train2014_%012d.jpg
    <root>/test/{img_ids,questions,answers,types}.txt      <root>/images/val2014/COCO_val2014_%012d.jpg

``clipqa-demo-data --out DIR`` writes it explicitly; training with
``experiment=demo`` generates it on first use under ``<paths.cache_dir>/demo/`` (default ``~/.cache/clipqa``, or
``$CLIPQA_CACHE_DIR``).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ["circle", "square", "triangle", "diamond"]
PLURAL = {s: s + "s" for s in SHAPES}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
}
PLACES = ["beach", "field", "kitchen", "street"]
NUMBERS = ["one", "two", "three", "four"]
QUESTIONS_PER_IMAGE = 2
TEST_ID_OFFSET = 500_000  # test images get their own COCO ids, stored under val2014/ like COCO-QA's


def _background(place: str, size: int, rng: random.Random) -> Image.Image:
    """A textured background per place (colour + a pattern, so it is not just one flat colour)."""
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    if place == "beach":  # sea on top, sand below
        d.rectangle([0, 0, size, size // 3], fill=(70, 150, 210))
        d.rectangle([0, size // 3, size, size], fill=(225, 200, 150))
    elif place == "field":  # grass with darker stripes
        d.rectangle([0, 0, size, size], fill=(110, 180, 90))
        for x in range(0, size, max(4, size // 12)):
            d.line([x, 0, x, size], fill=(80, 140, 60), width=2)
    elif place == "kitchen":  # chequered tiles
        d.rectangle([0, 0, size, size], fill=(235, 235, 235))
        t = max(4, size // 8)
        for i in range(0, size, t):
            for j in range(0, size, t):
                if (i // t + j // t) % 2:
                    d.rectangle([i, j, i + t, j + t], fill=(150, 150, 160))
    else:  # street: asphalt with white lane dashes
        d.rectangle([0, 0, size, size], fill=(70, 70, 75))
        for y in range(0, size, max(6, size // 6)):
            d.rectangle([size // 2 - 2, y, size // 2 + 2, y + size // 12], fill=(250, 250, 250))
    # Light noise so the background has texture, drawn from the seeded generator.
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-20, 21, size=(size, size, 1))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    outline = (0, 0, 0)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill, outline=outline, width=2)
    else:  # diamond
        d.polygon(
            [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill, outline=outline, width=2
        )


def render(shape: str, color: str, count: int, place: str, size: int, rng: random.Random) -> Image.Image:
    """``count`` shapes in distinct cells of a 2x2 grid (jittered), so they never overlap and can be counted."""
    im = _background(place, size, rng)
    d = ImageDraw.Draw(im)
    cell = size / 2
    for k in rng.sample(range(4), count):
        r = cell * rng.uniform(0.30, 0.38)
        cx = (k % 2 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (k // 2 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        _draw_shape(d, shape, cx, cy, r, COLORS[color])
    return im


def question(qtype: int, shape: str, color: str, count: int, place: str, rng: random.Random) -> tuple[str, str]:
    """A question of COCO-QA type ``qtype`` (0 object, 1 number, 2 color, 3 location) about a picture + its answer."""
    plural = PLURAL[shape]
    if qtype == 0:
        q = rng.choice(
            [
                f"what is the {color} object in the {place}",
                f"what {color} shape is in the picture",
                f"what kind of {color} thing is on the {place}",
            ]
        )
        return q, shape
    if qtype == 1:
        q = rng.choice(
            [
                f"how many {plural} are there",
                f"how many {color} {plural} are in the {place}",
                f"how many {plural} are in the picture",
            ]
        )
        return q, NUMBERS[count - 1]
    if qtype == 2:
        q = rng.choice(
            [
                f"what color is the {shape}",
                f"what is the color of the {plural}",
                f"what color are the {plural} in the {place}",
            ]
        )
        return q, color
    q = rng.choice([f"where is the {color} {shape}", f"where are the {plural}", f"where are the {color} {plural}"])
    return q, place


_question = question  # the name tests/helpers/handmade.py imports


def caption(shape: str, color: str, count: int, place: str, rng: random.Random) -> str:
    """A sentence describing a picture, in the questions' words (the tiny backbones' pretraining corpus)."""
    things = shape if count == 1 else PLURAL[shape]
    n = NUMBERS[count - 1]
    return rng.choice(
        [
            f"{n} {color} {things} in the {place}",
            f"a picture of {n} {color} {things} on the {place}",
            f"there {'is' if count == 1 else 'are'} {n} {color} {things} in the picture",
            f"the {things} in the {place} {'is' if count == 1 else 'are'} {color}",
            f"{n} {things} on the {place} , all {color}",
        ]
    )


def _write_split(root: Path, split: str, n_questions: int, size: int, rng: random.Random) -> None:
    folder, image_dir = ("train2014", "COCO_train2014") if split == "train" else ("val2014", "COCO_val2014")
    (root / split).mkdir(parents=True)
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    offset = 1 if split == "train" else TEST_ID_OFFSET
    n_images = math.ceil(n_questions / QUESTIONS_PER_IMAGE)
    rows: list[tuple[int, str, str, int]] = []
    for i in tqdm(range(n_images), desc=f"demo data: {split} images", unit="img", leave=False):
        image_id = offset + i
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        count, place = rng.randint(1, 4), rng.choice(PLACES)
        render(shape, color, count, place, size, rng).save(
            root / "images" / folder / f"{image_dir}_{image_id:012d}.jpg", quality=90
        )
        for qtype in rng.sample(range(4), QUESTIONS_PER_IMAGE):
            q, a = question(qtype, shape, color, count, place, rng)
            rows.append((image_id, q, a, qtype))
    rows = rows[:n_questions]
    for name, col in (("img_ids", 0), ("questions", 1), ("answers", 2), ("types", 3)):
        (root / split / f"{name}.txt").write_text("".join(f"{r[col]}\n" for r in rows), encoding="utf-8")


def generate(root: str | Path, n_train: int, n_test: int, seed: int, image_size: int) -> Path:
    """Write the demo dataset to ``root`` (atomically: a half-written folder is never left at ``root``)."""
    root = Path(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    _write_split(tmp, "train", n_train, image_size, rng)
    _write_split(tmp, "test", n_test, image_size, rng)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first: its copy is identical (same seed), keep it
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_demo(cache_dir: str | Path, n_train: int, n_test: int, seed: int, image_size: int) -> Path:
    """The demo dataset's folder under ``cache_dir/demo/``, generated on first use."""
    root = Path(cache_dir).expanduser() / "demo" / f"v1-train{n_train}-test{n_test}-seed{seed}-px{image_size}"
    if not (root / "test" / "types.txt").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        generate(root, n_train, n_test, seed, image_size)
    return root
