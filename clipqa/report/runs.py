"""From MLflow runs to the report's rows: which runs are in the report, which row (variant) each belongs to, and
each row's means and intervals (runs of one variant that differ only by seed are aggregated).

A row is named by what the user chose: the paper's version name (V1..V4), else the run's swept Hydra overrides
(``freeze=staged``, ``optimizer=adamw,optimizer.lr=0.001``: those that differ between the runs, read from the tag
``clipqa.overrides``), else, for runs not started with overrides, the config values that differ between the runs
(``freeze.text=True,...``).
"""

from __future__ import annotations

import math
import statistics

from clipqa.metrics import N_TEST_EVALUATED, TEST_ACC, TEST_PRIOR_ACC, TYPE_NAMES, VAL_ACC, WUPS_THRESHOLDS, wups_key
from clipqa.report.statistics import T975, wilson
from clipqa.tracking.run_info import NOT_VARIANT_PREFIXES, OVERRIDES_TAG, override_key, overrides_from_tag

# CLIQQA (Abbo), Table 1: accuracy on 80 test questions (10 shuffled batches of 8).
PAPER = {"V1": 0.288, "V2": 0.513, "V3": 0.550, "V4": 0.625}
NOT_VARIANT = ("trainer.seed", "params/")  # seeds are aggregated; parameter counts follow from the config
WUPS_KEYS = [wups_key(th) for th in WUPS_THRESHOLDS]


def select_runs(client, experiment_id: str, parent_run_id: str | None, filter_string: str | None) -> list:
    clauses = [f"tags.mlflow.parentRunId = '{parent_run_id}'"] if parent_run_id else []
    if filter_string:
        clauses.append(filter_string)
    runs = client.search_runs([experiment_id], " and ".join(clauses), max_results=5000)
    return [r for r in runs if r.data.tags.get("clipqa.sweep") != "true"]


def variant_keys(runs: list) -> list[str]:
    """The params whose values differ between the runs (ignoring seeds and output locations)."""
    keys = set().union(*(r.data.params for r in runs)) if runs else set()
    varying = []
    for k in sorted(keys):
        if k.startswith(NOT_VARIANT_PREFIXES + NOT_VARIANT):
            continue
        if len({r.data.params.get(k) for r in runs}) > 1:
            varying.append(k)
    return varying


def variant_label(run, keys: list[str]) -> str:
    """The row a run belongs to: its paper version name, else its values of the varying keys. When nothing but the
    seed varies every run is one variant (a seeds sweep: one row)."""
    if run.info.run_name in PAPER:
        return run.info.run_name
    if keys:
        return ",".join(f"{k}={run.data.params.get(k)}" for k in keys)
    return "same config"


def swept_keys(overrides: list[list[str]]) -> set[str]:
    """The override keys whose override differs between the runs (another value, or set in only some of them),
    ignoring seeds (aggregated) and output locations: the keys the sweep varied."""
    by_key = [{override_key(o): o for o in run} for run in overrides]
    keys = set().union(*by_key) if by_key else set()
    return {
        k
        for k in keys
        if not k.startswith(NOT_VARIANT_PREFIXES + NOT_VARIANT) and len({run.get(k) for run in by_key}) > 1
    }


def variant_labels(runs: list) -> dict[str, str]:
    """Run id -> the row it belongs to (see the module's docstring). Runs started with overrides are named by their
    swept ones (``defaults`` when they set none of them); a run without recorded overrides by the config values
    that differ. Override names are used only when they keep runs of different configs apart: two runs that
    differ in config but share a label (say two sweeps reported together) get the config-value names instead."""
    keys = variant_keys(runs)
    by_config = {r.info.run_id: variant_label(r, keys) for r in runs}
    overrides = {r.info.run_id: overrides_from_tag(r.data.tags.get(OVERRIDES_TAG)) for r in runs}
    overrides = {rid: o for rid, o in overrides.items() if o}
    swept = swept_keys(list(overrides.values()))
    if not swept:  # one run, a seeds sweep, or runs not started from Hydra's command line
        return by_config
    named = {rid: ",".join(o for o in ovs if override_key(o) in swept) or "defaults" for rid, ovs in overrides.items()}
    configs: dict[str, set[str]] = {}
    for rid, label in named.items():
        configs.setdefault(label, set()).add(by_config[rid])
    if any(len(c) > 1 for c in configs.values()):
        return by_config
    return {rid: by_config[rid] if rid not in named or by_config[rid] in PAPER else named[rid] for rid in by_config}


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else None


def seed_of(run) -> str | None:
    return run.data.params.get("trainer.seed")


def summarise(runs: list) -> list[dict]:
    """Group finished runs by variant; one dict per variant with means, intervals and bookkeeping."""
    labels = variant_labels(runs)
    single = len(runs) == 1 and not variant_keys(runs) and runs[0].info.run_name is not None
    groups: dict[str, list] = {}
    for r in runs:  # (a single run, e.g. the one job of a sweep that finished, is named as in MLflow)
        groups.setdefault(r.info.run_name if single else labels[r.info.run_id], []).append(r)
    rows = []
    for label, members in groups.items():
        m = [r.data.metrics for r in members]
        accs = [x[TEST_ACC] for x in m]
        mean = statistics.fmean(accs)
        if len(accs) > 1:
            sd = statistics.stdev(accs)
            half = T975.get(len(accs) - 1, 1.96) * sd / math.sqrt(len(accs))
            lo, hi = max(0.0, mean - half), min(1.0, mean + half)
        else:
            sd = None
            lo, hi = wilson(mean, int(m[0].get(N_TEST_EVALUATED, m[0].get("data/n_test", 0))))
        if label == "same config" and len(members) > 1:
            label = f"same config (seeds {', '.join(sorted(str(seed_of(r)) for r in members))})"
        wall = [(r.info.end_time - r.info.start_time) / 1000 for r in members if r.info.end_time]
        per_type = {f"{TEST_ACC}/{t}": _mean([x.get(f"{TEST_ACC}/{t}") for x in m]) for t in TYPE_NAMES.values()}
        wups = {}
        for key in WUPS_KEYS:
            wups[key] = _mean([x.get(key) for x in m])
            wups.update({f"{key}/{t}": _mean([x.get(f"{key}/{t}") for x in m]) for t in TYPE_NAMES.values()})
        rows.append(
            {
                "variant": label,
                "n": len(members),
                TEST_ACC: mean,
                "sd": sd,
                "ci_low": lo,
                "ci_high": hi,
                **per_type,
                **wups,
                VAL_ACC: _mean([x.get(VAL_ACC) for x in m]),
                TEST_PRIOR_ACC: _mean([x.get(TEST_PRIOR_ACC) for x in m]),
                "epochs": m[0].get("epochs", members[0].data.params.get("trainer.epochs")),
                "steps": _mean([x.get("steps") for x in m]),
                "trainable_params": _mean([x.get("params/trainable") for x in m]),
                "wall_s": _mean(wall),
                "paper_acc": PAPER.get(label),
                "runs": " ".join(r.info.run_id for r in members),
                "_members": members,
            }
        )
    rows.sort(key=lambda r: (r["variant"] not in PAPER, r["variant"]))
    return rows
