"""Build a small dataset by hand in the real COCO-QA + COCO 2014 layout (not through clipqa.data.demo.generate).

Images come in the modes real folders contain: RGB JPEG, greyscale JPEG, CMYK JPEG, and a PNG with alpha under a
.jpg name (COCO has a few such oddities). Train questions use train2014/, test questions val2014/.
"""

import random
from pathlib import Path

from PIL import Image

from clipqa.data.demo import COLORS, PLACES, SHAPES, _question, render

MODES = ["RGB", "L", "CMYK", "RGBA-png"]


def write_image(im: Image.Image, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA-png":
        im.convert("RGBA").save(path, format="PNG")  # PNG bytes behind a .jpg name
    else:
        im.convert(mode).save(path, format="JPEG")


def make_cocoqa(root: Path, n_train_images: int = 60, n_test_images: int = 20, seed: int = 1) -> tuple[Path, Path]:
    """Returns (data.root, data.image_root). Two questions per image, types cycling through all four."""
    rng = random.Random(seed)
    data_root, image_root = root / "cocoqa", root / "coco"
    for split, folder, prefix, n_images, first_id in (
        ("train", "train2014", "COCO_train2014", n_train_images, 9),
        ("test", "val2014", "COCO_val2014", n_test_images, 100_003),
    ):
        rows = []
        for i in range(n_images):
            image_id = first_id + 7 * i
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            count, place = rng.randint(1, 4), rng.choice(PLACES)
            im = render(shape, color, count, place, 64, rng)
            write_image(im, image_root / folder / f"{prefix}_{image_id:012d}.jpg", MODES[i % len(MODES)])
            for qtype in ((2 * i) % 4, (2 * i + 1) % 4):
                q, a = _question(qtype, shape, color, count, place, rng)
                rows.append((image_id, q, a, qtype))
        (data_root / split).mkdir(parents=True, exist_ok=True)
        for name, col in (("img_ids", 0), ("questions", 1), ("answers", 2), ("types", 3)):
            (data_root / split / f"{name}.txt").write_text("".join(f"{r[col]}\n" for r in rows))
    return data_root, image_root
