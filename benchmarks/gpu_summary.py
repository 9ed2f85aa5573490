"""The last step of benchmarks/gpu.sh: one summary of its parts' JSON files, printed and written to summary.json.
Usage: ``python benchmarks/gpu_summary.py OUT_DIR``."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(path: Path) -> dict | None:
    """tests, failures, errors, skipped from a JUnit XML report (pytest --junitxml)."""
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def summarise(out: Path) -> dict:
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines() if line.strip()]
    env, tp, t1 = read_json(out / "env.json") or {}, read_json(out / "throughput.json"), read_json(out / "table1.json")
    summary: dict = {
        "device": env.get("device"),
        "torch": env.get("torch"),
        "parts": {p["part"]: {"rc": p["rc"], "seconds": p["seconds"]} for p in parts},
        "seconds": sum(p["seconds"] for p in parts),
        "pytest_gpu": pytest_counts(out / "pytest-gpu.xml"),
    }
    if tp:  # a part stopped by its time limit leaves the stages it finished (stages_done), complete=false
        keys = ("original_examples_per_s", "clipqa_examples_per_s", "clipqa_cls_examples_per_s", "speedup_cached")
        summary["throughput"] = {k: tp.get(k) for k in (*keys, "original_mfu", "clipqa_mfu", "clipqa_cls_mfu")}
        summary["throughput"] |= {k: tp.get(k) for k in ("complete", "stages_done")}
    if t1:
        table = t1.get("table1_projected") or {}
        projected = table.get("total_seconds")
        cache = t1.get("coco_cache_build_seconds_projected")
        summary["table1"] = {
            "v2_steps_per_s_batch8": t1.get("v2_steps_per_s"),
            "text_trains_steps_per_s": t1.get("text_trains_steps_per_s"),
            "eval_questions_per_s": t1.get("eval_questions_per_s"),
            "projected_table1_minutes": round(projected / 60, 1) if projected is not None else None,
            "projected_breakdown_s": {k: table.get(k) for k in ("train_seconds", "eval_seconds", "startup_seconds")},
            "coco_cache_build_minutes": round(cache / 60, 1) if cache is not None else None,
            "complete": t1.get("complete"),
            "stages_done": t1.get("stages_done"),
            "goal": ">= ~120 V2 steps/s and <= 10 minutes for the table",
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"== summary ({out / 'summary.json'})")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
