"""Training throughput: the paper's per-step pipeline against clipqa with its frozen-feature cache, in one process.

    python benchmarks/throughput.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/throughput.py --steps 50      # steadier figures
    python benchmarks/throughput.py --device cuda   # on a GPU machine (adds model FLOPs utilisation)
    python benchmarks/throughput.py --device cuda --steps 200 --lrs 1e-4 --out t.json   # benchmarks/gpu.sh's

Offline: it writes real-size models with random weights (CLIP ViT-B/32 and distilbert-base-uncased
architectures; a 30,522-entry WordPiece vocabulary) with ``save_pretrained`` and a synthetic dataset in the COCO-QA
layout with 640x480 JPEGs, then measures training examples/s of

(a) the original pipeline (benchmarks/original.py: decode + CLIP pre-processing + CLIP forward every step, questions
    padded to 63, head over all 113 positions), the paper's V2: 2 mapper layers, frozen text, batch 8, Adam 1e-4;
(b) clipqa, same sizes, batch and configuration, through ``clipqa.training.run.train`` with the feature cache;
(c) clipqa with the CLS token only (``image_tokens=cls``);

and the wall time of a 4-variant sweep (``optimizer.lr`` x4 by default, ``--lrs``; each run as many steps as the
original run; the cache built once by ``clipqa-cache`` and counted) against 4 x the original script's whole run
(load, validate at step 0, train, validate, plot, 80-question test, save; see benchmarks/original.py), the same
work per variant. The last line printed is one JSON object with every figure (also written to ``--out``).

On CUDA clipqa runs with its GPU defaults (``trainer.device=cuda``: bf16 autocast, CUDA graphs over bucketed
question lengths, pinned batches) and evaluates at batch 1024; model FLOPs utilisation (MFU) is FLOPs per example
(torch's FlopCounterMode over one training step) x examples/s over the GPU's dense bf16 peak (``PEAK_BF16_FLOPS``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path[:0] = [str(HERE), str(PROJECT)]  # benchmarks/original.py; clipqa without an install

import original  # noqa: E402  (benchmarks/original.py)

BATCH = 8
# Dense bf16 tensor-core peak per GPU (vendor data sheets), matched in this order against torch's device name.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


class PartialResult(dict):
    """The result so far, rewritten (atomically) to ``path`` after every stage, so a part that benchmarks/gpu.sh's
    time limit stops still leaves the figures of the stages it finished: ``stages_done`` lists them, ``complete`` is
    true only at the end."""

    def __init__(self, path: str | None, **fields):
        super().__init__(fields, stages_done=[], complete=False)
        self.path = Path(path) if path else None
        self.write()

    def stage(self, name: str, **figures) -> None:
        self.update(figures)
        self["stages_done"].append(name)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self, indent=1) + "\n")
            os.replace(tmp, self.path)


# COCO-QA-like questions: 8-14 words, four types, one-word answers.
OBJECTS = ["cat", "dog", "man", "woman", "horse", "train", "bus", "plate", "pizza", "bench", "bird", "kite", "truck"]
PLACES = ["street", "table", "field", "kitchen", "beach", "room", "road", "grass", "water", "snow", "park", "track"]
COLORS = ["red", "white", "black", "blue", "green", "yellow", "brown", "orange", "gray", "pink"]
NUMBERS = ["two", "three", "four", "five", "six"]
VERBS = ["sitting", "standing", "parked", "lying", "walking", "riding", "resting", "waiting"]
FILLER = ["large", "small", "old", "white", "young", "wooden", "big", "little"]


def question(rng: random.Random) -> tuple[str, str, int]:
    t = rng.randrange(4)
    obj, place, verb, adj = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(VERBS), rng.choice(FILLER)
    if t == 0:
        return f"what is {verb} on the {adj} {place} next to the {rng.choice(OBJECTS)}", obj, 0
    if t == 1:
        return f"how many {obj}s are {verb} on the {adj} {place} near the {rng.choice(OBJECTS)}", rng.choice(NUMBERS), 1
    if t == 2:
        return f"what is the color of the {adj} {obj} {verb} on the {place}", rng.choice(COLORS), 2
    return f"where is the {adj} {obj} {verb} with the {rng.choice(OBJECTS)}", place, 3


def photo(rng: np.random.Generator):
    """A 640x480 picture with smooth colour regions, shapes and sensor noise (JPEG size close to COCO's)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, 600)), int(rng.integers(0, 440))
        w, h = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + w, y + h], fill=fill)
    arr = np.asarray(im).astype(np.int16) + rng.normal(0, 10, (480, 640, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_dataset(root: Path, n_train_images: int, n_test_images: int, per_image: int, seed: int) -> list[str]:
    """COCO-QA layout (train/, test/ text files; images/train2014, images/val2014). Returns every text line."""
    rng, nrng, text = random.Random(seed), np.random.default_rng(seed), []
    for split, n_images, folder, first_id in [
        ("train", n_train_images, "train2014", 1),
        ("test", n_test_images, "val2014", 500_000),
    ]:
        (root / "cocoqa" / split).mkdir(parents=True)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        ids, qs, ans, types = [], [], [], []
        for image_id in range(first_id, first_id + n_images):
            photo(nrng).save(root / "images" / folder / f"COCO_{folder}_{image_id:012d}.jpg", quality=90)
            for _ in range(per_image):
                q, a, t = question(rng)
                ids.append(image_id), qs.append(q), ans.append(a), types.append(t)
        for name, rows in [("img_ids", ids), ("questions", qs), ("answers", ans), ("types", types)]:
            (root / "cocoqa" / split / f"{name}.txt").write_text("\n".join(map(str, rows)) + "\n")
        text += qs + ans
    return text


def write_models(folder: Path, text: list[str]) -> tuple[Path, Path]:
    """Real-size random-init CLIP ViT-B/32 vision tower + DistilBERT-base, saved like hub checkpoints."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        DistilBertConfig,
        DistilBertModel,
        DistilBertTokenizer,
    )

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig()).save_pretrained(folder / "vision")  # defaults = ViT-B/32 (224 px, 50 tokens)
    CLIPImageProcessor().save_pretrained(folder / "vision")  # defaults = openai/clip-vit-base-patch32's
    # A bert-base-uncased-shaped vocabulary of exactly 30,522 entries: specials at their usual ids, the data's
    # words, single characters and ##-pieces, then unused slots.
    words = sorted({w for line in text for w in line.split()})
    chars = sorted({c for line in text for c in line if c != " "})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [w for w in chars + words + [f"##{c}" for c in chars] if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    tokenizer = DistilBertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    DistilBertModel(DistilBertConfig(vocab_size=len(vocab))).save_pretrained(folder / "text")  # distilbert-base
    tokenizer.save_pretrained(folder / "text")
    return folder / "vision", folder / "text"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_original(work: Path, vision_dir: Path, text_dir: Path, device: torch.device, steps: int, warmup: int) -> dict:
    """(a): one whole run of the script (benchmarks/original.py) with warmup + steps training steps."""
    out = work / "original"
    out.mkdir(exist_ok=True)
    r = original.run_script(work / "data", vision_dir, text_dir, device, steps + warmup, warmup, out)
    flops = count_flops(
        partial(original.train_step, r["model"].train(), r["optimizer"], r["loss_fxn"], r["first_batch"])
    )
    result = {
        "examples_per_s": r["steps_timed"] * BATCH / r["step_seconds"],
        "wall_seconds": r["wall_seconds"],
        "flops_per_example": flops / BATCH,
    }
    del r  # free the original's models before clipqa's runs (peak memory is measured)
    gc.collect()
    return result


def clipqa_overrides(work: Path, vision_dir: Path, text_dir: Path, device: str, steps: int) -> list[str]:
    """The paper's V2 (2 mapper layers, hidden 1024, frozen text, vocab head read at the last position, Adam 1e-4,
    batch 8) on the benchmark's data and models; evaluation kept small (it is not what is measured)."""
    return [
        f"data.root={work / 'data' / 'cocoqa'}",
        f"data.image_root={work / 'data' / 'images'}",
        "data.val_fraction=0.05",
        f"backbone.vision={vision_dir}",
        f"backbone.text={text_dir}",
        f"paths.cache_dir={work / 'cache'}",
        "+paper=V2",
        "head.readout=last",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=1000000",
        "trainer.checkpoint_every=null",  # no resume checkpoints at all (not even at epoch ends): not what is timed
        "trainer.save_checkpoint=false",
        f"trainer.device={device}",
        "tracking=none",
        *(["trainer.eval_batch_size=1024"] if device == "cuda" else []),  # a GPU evaluates large batches
    ]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_clipqa(work: Path, name: str, overrides: list[str], warmup: int) -> tuple[dict, float]:
    """One full clipqa run (set-up, training, validation, test) through clipqa.training.run.train; (metrics, wall s).

    ``metrics["steady_examples_per_s"]``: training examples/s after the first ``warmup`` steps, the same exclusion as
    the original's (a); clipqa's own ``train/examples_per_s`` counts every step. Read from the cumulative rate the
    loop logs at step ``warmup`` (``trainer.log_every=warmup``) and its final ``train/seconds``.
    """
    from clipqa.tracking.tracker import Tracker
    from clipqa.training.run import train

    class StepClock(Tracker):  # records the loop's (step, cumulative examples/s) rows
        def __init__(self):
            self.rows: dict[int, float] = {}

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "train/examples_per_s" in metrics:
                self.rows[step] = metrics["train/examples_per_s"]

    clock = StepClock()
    t0 = time.perf_counter()
    metrics = train(compose(overrides + [f"trainer.log_every={max(warmup, 1)}"]), work / "runs" / name, tracker=clock)
    wall = time.perf_counter() - t0
    steps = metrics["steps"]
    warm_seconds = warmup * BATCH / clock.rows[warmup] if warmup else 0.0
    metrics["steady_examples_per_s"] = (steps - warmup) * BATCH / (metrics["train/seconds"] - warm_seconds)
    return metrics, wall


def clipqa_flops_per_example(overrides: list[str], device_type: str = "cpu") -> tuple[float, float]:
    """FLOPs of one clipqa V2 training step (forward + backward, from cached features) / batch size, with all 50
    image tokens and with the CLS token only, in the layout that trains on ``device_type``: packed real tokens on a
    CPU; on CUDA (CUDA graphs) the padded layout over the bucketed question length, every position computed. Counted
    on the CPU either way (a FLOP count does not depend on where it runs)."""
    from clipqa.config import validate
    from clipqa.data.cocoqa import bucket_lengths
    from clipqa.models.backbones import load_backbone
    from clipqa.models.freeze import apply_freeze
    from clipqa.models.packed_text import encode_packed
    from clipqa.training.build import build_model

    cfg = validate(compose(overrides))
    backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    model = build_model(cfg, backbone, len(backbone.tokenizer))
    apply_freeze(model, vision=True, text=True, mapper=False)
    enc = backbone.tokenizer([question(random.Random(i))[0] for i in range(BATCH)], padding=True, return_tensors="pt")

    graphs = device_type == "cuda"
    if graphs:
        model.graphed_text = encode_packed  # what the compiled graphs compute: rows=None, the padded layout

    def step(n_tokens: int):
        feats = torch.randn(BATCH, n_tokens, 768).half()
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        if graphs:  # the loader's bucket for this batch: T + n_tokens a multiple of 16
            lengths = bucket_lengths(list(cfg.trainer.length_buckets), cfg.backbone.image_position_offset, n_tokens)
            pad = next(t for t in lengths if t >= ids.shape[1]) - ids.shape[1]
            ids, mask = F.pad(ids, (0, pad), value=backbone.tokenizer.pad_token_id), F.pad(mask, (0, pad))  # (B, T')
        logits = model(ids, mask, image_features=feats)
        torch.nn.functional.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long)).backward()

    return count_flops(partial(step, 50)) / BATCH, count_flops(partial(step, 1)) / BATCH


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="measured training steps per pipeline (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="original pipeline: untimed steps first (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--lrs", default="1e-4,3e-5,3e-4,1e-3", help="the sweep's optimizer.lr values (1e-4 is run (b))")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    lrs = args.lrs.split(",")  # lr 1e-4 is the paper's V2: its run is (b)
    if "1e-4" not in lrs:
        p.error("--lrs must include 1e-4 (the paper's V2: run (b))")
    n = len(lrs)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clipqa-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps
    # Enough training questions for warm-up + measured steps of the original, and for clipqa's max_steps.
    n_train_images = (steps + args.warmup) * BATCH // 4 + 8
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    try:
        say(f"[setup] {work}: synthetic COCO-QA ({n_train_images}+16 640x480 JPEGs) and real-size random models")
        text = write_dataset(work / "data", n_train_images, 16, per_image=4, seed=0)
        vision_dir, text_dir = write_models(work / "models", text)
        overrides = clipqa_overrides(work, vision_dir, text_dir, device.type, steps + args.warmup)

        result = PartialResult(
            args.out,
            steps=steps,
            batch_size=BATCH,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            threads=torch.get_num_threads(),
            original_to_tensor=original.TO_TENSOR,
            torch=torch.__version__,
        )
        peak = peak_flops(result["device"]) if device.type == "cuda" else None
        if device.type == "cuda":
            result["peak_bf16_flops"] = peak

        def mfu(rate: float, flops: float) -> dict:  # model FLOPs utilisation, on CUDA only
            return {"mfu": round(rate * flops / peak, 4) if peak else None} if device.type == "cuda" else {}

        say("[flops] FLOPs per example of clipqa's training step, in the layout this device trains")
        flops_b, flops_c = clipqa_flops_per_example(overrides, device.type)
        result.stage("flops", clipqa_flops_per_example=flops_b, clipqa_cls_flops_per_example=flops_c)

        say(f"[a] original script: one run of {args.warmup} warm-up + {steps} timed steps of batch {BATCH}")
        a = run_original(work, vision_dir, text_dir, device, steps, args.warmup)
        say(f"    {a['examples_per_s']:.2f} examples/s; whole run {a['wall_seconds']:.1f} s")
        result.stage(
            "original",
            original_examples_per_s=round(a["examples_per_s"], 3),
            original_run_seconds=round(a["wall_seconds"], 1),
            original_flops_per_example=a["flops_per_example"],
            **{f"original_{k}": v for k, v in mfu(a["examples_per_s"], a["flops_per_example"]).items()},
        )

        say("[cache] clipqa-cache (all 50 tokens)")
        from clipqa.cli import cache as cache_main

        t0 = time.perf_counter()
        cache_main(overrides)
        cache_seconds = time.perf_counter() - t0
        result.stage("cache", cache_build_seconds=round(cache_seconds, 1))

        sweep, walls = {}, []
        for lr in lrs:
            say(f"[b/sweep] clipqa V2, optimizer.lr={lr}, {steps + args.warmup} steps (as many as the original run)")
            m, wall = run_clipqa(work, f"lr{lr}", overrides + [f"optimizer.lr={lr}"], args.warmup)
            sweep[lr], walls = m, walls + [wall]
            say(f"    {m['steady_examples_per_s']:.2f} examples/s, run wall {wall:.1f} s")
            figures = {f"sweep{n}_run_seconds": [round(w, 1) for w in walls]}
            if lr == "1e-4":
                rate = m["steady_examples_per_s"]
                figures |= {
                    "clipqa_examples_per_s": round(rate, 3),
                    "speedup_cached": round(rate / a["examples_per_s"], 2),
                    "clipqa_examples_per_s_all_steps": round(m["train/examples_per_s"], 3),  # warm-up steps included
                    **{f"clipqa_{k}": v for k, v in mfu(rate, flops_b).items()},
                }
            result.stage(f"b lr={lr}", **figures)
        sweep_wall = cache_seconds + sum(walls)
        result.stage(
            "sweep",
            **{
                f"sweep{n}_seconds": round(sweep_wall, 1),
                f"original{n}_seconds": round(n * a["wall_seconds"], 1),
                f"sweep{n}_speedup": round(n * a["wall_seconds"] / sweep_wall, 2),
            },
        )

        say(f"[c] clipqa V2 with image_tokens=cls, {steps + args.warmup} steps (builds its own, 50x smaller cache)")
        c, c_wall = run_clipqa(work, "cls", overrides + ["image_tokens=cls"], args.warmup)
        say(f"    {c['steady_examples_per_s']:.2f} examples/s")
        rate = c["steady_examples_per_s"]
        result.stage(
            "cls",
            clipqa_cls_examples_per_s=round(rate, 3),
            speedup_cls=round(rate / a["examples_per_s"], 2),
            clipqa_cls_examples_per_s_all_steps=round(c["train/examples_per_s"], 3),
            **{f"clipqa_cls_{k}": v for k, v in mfu(rate, flops_c).items()},
        )
        result["peak_rss_gib"] = round(peak_rss_gib(), 3)
        result["complete"] = True
        result.write()
        print(json.dumps(result))
        return dict(result)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
