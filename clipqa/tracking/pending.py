"""The MLflow writes a run could not make: kept as plain JSON in ``<run folder>/mlflow_pending.json`` and uploaded
later with ``clipqa-sync <run folder>`` (:func:`sync`)."""

from __future__ import annotations

import json
from pathlib import Path

PENDING_FILE = "mlflow_pending.json"  # MLflow writes a run could not make; plain JSON, uploaded by clipqa-sync
QUEUEABLE = ("log_batch", "log_artifact", "set_terminated")  # the only client methods a pending file may name


def encode_op(method: str, args: tuple, kwargs: dict) -> dict:
    """A queued MLflow write as JSON: entity lists (Param, Metric, RunTag) become lists of their fields."""
    kw = {k: v for k, v in kwargs.items() if k not in ("params", "metrics", "tags")}
    kw["params"] = [[p.key, p.value] for p in kwargs.get("params") or []]
    kw["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in kwargs.get("metrics") or []]
    kw["tags"] = [[t.key, t.value] for t in kwargs.get("tags") or []]
    return {"method": method, "args": list(args), "kwargs": kw}


def decode_op(op: dict) -> tuple[str, list, dict]:
    from mlflow.entities import Metric, Param, RunTag

    if op.get("method") not in QUEUEABLE:
        raise ValueError(f"unknown MLflow write {op.get('method')!r} (expected one of {', '.join(QUEUEABLE)})")
    kw = dict(op["kwargs"])
    params, metrics, tags = kw.pop("params", []), kw.pop("metrics", []), kw.pop("tags", [])
    if op["method"] == "log_batch":
        kw.update(
            params=[Param(*p) for p in params], metrics=[Metric(*m) for m in metrics], tags=[RunTag(*t) for t in tags]
        )
    return op["method"], op["args"], kw


def sync(run_dir: str | Path) -> int:
    """Upload the MLflow writes a run could not make (``mlflow_pending.json``); return how many were made."""
    from mlflow.tracking import MlflowClient

    path = Path(run_dir) / PENDING_FILE
    data = json.loads(path.read_text())
    client = MlflowClient(tracking_uri=data["uri"])
    ops = [decode_op(op) for op in data["ops"]]
    for method, args, kwargs in ops:
        getattr(client, method)(*args, **kwargs)
    path.unlink()
    return len(ops)
