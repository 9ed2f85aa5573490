"""Real-size V2 training steps/s at the paper's batch of 8, and the wall time of the paper's Table 1 projected from it.

    python benchmarks/table1_time.py --device cuda --out t1.json          # what benchmarks/gpu.sh runs
    python benchmarks/table1_time.py --device cpu --steps 4 --warmup 2    # a dry run of every piece (~3 minutes)

Offline, like benchmarks/throughput.py (its data and model writers): real-size random-weight CLIP ViT-B/32 +
distilbert-base (30,522-entry vocabulary) saved like hub checkpoints, synthetic COCO-QA-format data with 640x480
JPEGs. Through ``clipqa.training.run.train`` with the device's defaults (on CUDA: bf16 autocast, CUDA graphs over
bucketed
question lengths, pinned batches; evaluation at batch 1024) it measures

1. the feature cache build (``clipqa-cache``, decoding in one worker per core): images/s, and COCO 2014's 123,287
   images at that rate;
2. V2 (``+paper=V2``: frozen text, 2-layer mapper, vocab head read at the last image token, Adam, batch 8):
   optimizer steps/s after ``--warmup`` steps (compilation and graph recording), data loading included;
3. the same with the text model training (the V3 and V4 phases: ``freeze.text=false``): steps/s;
4. evaluation questions/s, from the runs' test passes (at trainer.eval_batch_size), each after an untimed warm-up
   pass over the same questions;
5. each run's start-up (set-up and compilation): its wall time minus the steady training and evaluation time.

Projection of Table 1 (V1, V2, V3 = V2 then an epoch with the text model training, V4 = V3 then one more; clipqa's
defaults on COCO-QA: 78,736 training questions of which 10% validate, batch 8, validation every 2,000 steps and at
every epoch end, the full 38,948-question test after every phase): frozen-text epochs at (2)'s rate (V1 trains
less than V2, so this is an upper bound), text-training epochs at (3)'s rate, every validation and test at (4)'s
rate, plus start-up: 4 runs x (2)'s, and (3)'s once more for each of V3 and V4 (a phase that unfreezes the text model
compiles again). The last line printed is one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/throughput.py; clipqa without an install

import throughput  # noqa: E402  (benchmarks/throughput.py)

BATCH = 8
# COCO-QA and clipqa's defaults (conf/data/cocoqa.yaml val_fraction, conf/trainer/default.yaml eval_every).
COCOQA_TRAIN, COCOQA_TEST, VAL_FRACTION, EVAL_EVERY, COCO_IMAGES = 78_736, 38_948, 0.1, 2000, 123_287
# Table 1's runs as (epochs with the text model frozen, epochs with it training, phases): conf/paper/V1..V4.yaml.
TABLE1 = {"V1": (1, 0, 1), "V2": (1, 0, 1), "V3": (1, 1, 2), "V4": (1, 2, 3)}


class Clock:
    """Times clipqa.training.loop.evaluate calls (split, questions, seconds) and the cache build's encoding."""

    def __init__(self):
        self.evals: list[tuple[str, int, float]] = []
        self.build_seconds = 0.0

    def wrap_build(self):
        import clipqa.models.feature_cache

        build = clipqa.models.feature_cache._build

        def timed(*args, **kwargs):  # decoding in worker processes, CLIP, writing rows (not the key's weight digest)
            t0 = time.perf_counter()
            build(*args, **kwargs)
            self.build_seconds += time.perf_counter() - t0

        clipqa.models.feature_cache._build = timed

    def wrap_evaluate(self):
        import clipqa.training.loop

        evaluate = clipqa.training.loop.evaluate

        def timed(model, loader, device, precision, split):
            if split == "test":  # the rate's pass must not carry first-call costs (kernel choice, allocator growth)
                t0 = time.perf_counter()
                evaluate(model, loader, device, precision, split)
                self.evals.append(("test-warmup", len(loader.dataset), time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = evaluate(model, loader, device, precision, split)  # ends with a host read: the GPU is done
            self.evals.append((split, len(loader.dataset), time.perf_counter() - t0))
            return out

        clipqa.training.loop.evaluate = timed


def run_rate(work: Path, name: str, overrides: list[str], warmup: int, clock: Clock) -> dict:
    """One clipqa run: steady steps/s after ``warmup`` steps, its test-pass rate and its start-up seconds."""
    first_eval = len(clock.evals)
    metrics, wall = throughput.run_clipqa(work, name, overrides, warmup)
    evals = clock.evals[first_eval:]
    steps_per_s = metrics["steady_examples_per_s"] / BATCH
    tests = [(n, s) for split, n, s in evals if split == "test"]
    eval_seconds = sum(s for _, _, s in evals)
    steady = (metrics["steps"] - warmup) / steps_per_s
    return {
        "steps_per_s": round(steps_per_s, 2),
        "steps": metrics["steps"],
        "warmup_steps": warmup,
        "test_questions_per_s": round(sum(n for n, _ in tests) / sum(s for _, s in tests), 1),
        "eval_seconds": round(eval_seconds, 2),
        "wall_seconds": round(wall, 1),
        "startup_seconds": round(wall - steady - eval_seconds, 1),  # set-up, compilation and graph recording
    }


def project(v2: dict, text: dict, eval_rate: float) -> dict:
    """Table 1's wall time on COCO-QA at these rates (see the module docstring)."""
    train_n = COCOQA_TRAIN - round(COCOQA_TRAIN * VAL_FRACTION)
    val_n, steps_per_epoch = COCOQA_TRAIN - train_n, math.ceil(train_n / BATCH)
    val_per_epoch = (steps_per_epoch - 1) // EVAL_EVERY + 1  # every EVAL_EVERY steps, and at the epoch end
    frozen = sum(f for f, _, _ in TABLE1.values())
    trains = sum(t for _, t, _ in TABLE1.values())
    phases = sum(p for _, _, p in TABLE1.values())
    train_s = steps_per_epoch * (frozen / v2["steps_per_s"] + trains / text["steps_per_s"])
    eval_questions = (frozen + trains) * val_per_epoch * val_n + phases * COCOQA_TEST
    eval_s = eval_questions / eval_rate
    unfreezing_runs = sum(t > 0 for _, t, _ in TABLE1.values())
    startup_s = len(TABLE1) * v2["startup_seconds"] + unfreezing_runs * text["startup_seconds"]
    return {
        "steps_per_epoch": steps_per_epoch,
        "epochs": frozen + trains,
        "train_seconds": round(train_s, 1),
        "eval_questions": eval_questions,
        "eval_seconds": round(eval_s, 1),
        "startup_seconds": round(startup_s, 1),
        "total_seconds": round(train_s + eval_s + startup_s, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--steps", type=int, default=1000, help="measured V2 steps after the warm-up (default 1000)")
    p.add_argument("--warmup", type=int, default=200, help="steps not measured: compilation, graphs (default 200)")
    p.add_argument("--text-steps", type=int, default=None, help="measured steps with the text model training")
    p.add_argument("--test-images", type=int, default=64, help="test images x 8 questions: one test pass (64)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clipqa-table1-"))
    work.mkdir(parents=True, exist_ok=True)
    text_steps = args.text_steps if args.text_steps is not None else max(1, args.steps // 2)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    clock = Clock()
    clock.wrap_evaluate()
    clock.wrap_build()
    try:
        # 100 training images x 8 questions (760 after the 5% validation split: 95 steps per epoch, epochs repeat
        # it), --test-images x 8 questions (one test pass per run: 512 questions by default).
        n_images = 100 + args.test_images
        say(f"[setup] {work}: synthetic COCO-QA ({n_images} 640x480 JPEGs), real-size random models")
        text = throughput.write_dataset(work / "data", 100, args.test_images, per_image=8, seed=0)
        vision_dir, text_dir = throughput.write_models(work / "models", text)
        eval_batch = 1024 if device == "cuda" else 64

        def overrides(steps: int) -> list[str]:
            base = throughput.clipqa_overrides(work, vision_dir, text_dir, device, steps)
            return [*base, f"trainer.epochs={math.ceil(steps / 95) + 1}", f"trainer.eval_batch_size={eval_batch}"]

        result = throughput.PartialResult(
            args.out,
            device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            torch=torch.__version__,
            batch_size=BATCH,
            eval_batch_size=eval_batch,
        )
        say("[1] feature cache build (clipqa-cache)")
        from clipqa.cli import cache as cache_main

        t0 = time.perf_counter()
        cache_main(overrides(1))
        cache_s = time.perf_counter() - t0
        images_per_s = n_images / clock.build_seconds
        result.stage(
            "cache",
            cache_images_per_s=round(images_per_s, 1),
            coco_cache_build_seconds_projected=round(COCO_IMAGES / images_per_s, 1),
            cache_build_seconds=round(clock.build_seconds, 1),
            cache_command_seconds=round(cache_s, 1),
        )

        say(f"[2] V2 at batch {BATCH}: {args.warmup} warm-up + {args.steps} timed steps")
        v2 = run_rate(work, "V2", overrides(args.warmup + args.steps), args.warmup, clock)
        say(f"    {v2['steps_per_s']} steps/s, start-up {v2['startup_seconds']} s")
        result.stage("V2", v2_steps_per_s=v2["steps_per_s"], runs={"V2": v2})
        say(f"[3] text model training: {args.warmup} warm-up + {text_steps} timed steps")
        text_run = overrides(args.warmup + text_steps) + ["freeze.text=false"]
        trains = run_rate(work, "text", text_run, args.warmup, clock)
        say(f"    {trains['steps_per_s']} steps/s, start-up {trains['startup_seconds']} s")
        result.stage("text", text_trains_steps_per_s=trains["steps_per_s"], runs={"V2": v2, "text_trains": trains})

        eval_rate = min(v2["test_questions_per_s"], trains["test_questions_per_s"])
        result.stage("projection", eval_questions_per_s=eval_rate, table1_projected=project(v2, trains, eval_rate))
        result["complete"] = True
        result.write()
        print(json.dumps(result))
        return dict(result)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
