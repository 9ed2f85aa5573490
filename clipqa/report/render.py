"""Writing the report's files: ``report.md`` (the main table, per question type, training, an Optuna study's Pareto
front), ``report.csv`` (one row per variant, every column) and ``report.tex`` (the main table as a booktabs LaTeX
table, for a paper)."""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
from pathlib import Path

from clipqa.metrics import TEST_ACC, TEST_PRIOR_ACC, TYPE_NAMES, VAL_ACC, WUPS_THRESHOLDS, wups_label
from clipqa.report.runs import WUPS_KEYS
from clipqa.report.statistics import ALPHA


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(x: float) -> str:
    if math.isnan(x):
        return ""
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]


def write_markdown(rows: list[dict], path: Path, title: str, skipped: list[str], details: list[str] = ()) -> None:
    """``details``: lines under the title (the sweep's command, where the runs were read from)."""
    paper = any(r["paper_acc"] is not None for r in rows)
    wups = any(r[k] is not None for r in rows for k in WUPS_KEYS)
    base = next((r["baseline"] for r in rows if r.get("baseline")), None)
    head = ["variant", "n", "test acc %", "95% interval"]
    head += [f"{wups_label(th)} %" for th in WUPS_THRESHOLDS] if wups else []
    head += [f"Δ acc vs `{base}` (points)", "95% interval of Δ", "p (Holm)", "test"] if base else []
    head += ["paper acc % (80 q)"] if paper else []
    body = []
    for r in rows:
        acc = _pct(r[TEST_ACC]) + (f" ± {100 * r['sd']:.1f}" if r["sd"] is not None else "")
        cells = [f"`{r['variant']}`", str(r["n"]), acc, f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}"]
        cells += [_pct(r[k]) for k in WUPS_KEYS] if wups else []
        if base and r["variant"] == base:
            cells += ["baseline", "", "", ""]
        elif base:
            diff = "" if r["diff"] is None else f"{100 * r['diff']:+.1f}"
            ci = "" if r["diff"] is None else f"{100 * r['diff_low']:+.1f} to {100 * r['diff_high']:+.1f}"
            mark = " **\\***" if r["significant"] else ""
            test = r["test"] or ""
            if r["b"] is not None:
                test += f" (b={r['b']}, c={r['c']}, {r['n_paired']} q)"
            cells += [diff, ci, _p(r["p_holm"]) + mark, test]
        if paper:
            cells.append(_pct(r["paper_acc"]))
        body.append(cells)
    lines = [f"# {title}", *details, "", *_table(head, body), ""]  # (details: no blank line, the table stays 2nd)
    lines.append(
        "Test accuracy is over the full test split; n = runs aggregated (differing only by seed; ± is the sd, the "
        "interval a t-interval of the mean). A single run's interval is a Wilson interval over the test questions "
        "it answered."
    )
    if wups:
        lines.append(
            "WUPS@0.9 / WUPS@0.0: Wu-Palmer similarity over WordNet noun synsets (Malinowski & Fritz 2014), scores "
            "below the threshold times 0.1; COCO-QA's standard soft accuracy."
        )
    if base:
        lines += [
            "",
            f"Paired comparison with `{base}` on the same test questions: Δ = accuracy minus the baseline's; for "
            "single runs an exact McNemar test on the questions only one of the two got right (b: only the "
            "baseline, c: only this row) with an Agresti-Min 95% interval of Δ; for rows of several seeds a paired "
            f"t-test over the shared seeds. p is Holm-adjusted over the rows; **\\*** marks p < {ALPHA:g}.",
        ]
    if paper:
        lines += [
            "",
            "The paper's numbers were measured on only 80 test questions (10 shuffled batches of 8), so each "
            "is uncertain by about ±11 points at 95%; ours use every test question.",
        ]
    types = list(TYPE_NAMES.values())
    type_head = ["variant", *[f"acc {t}" for t in types]]
    type_body = [[f"`{r['variant']}`", *[_pct(r[f"{TEST_ACC}/{t}"]) for t in types]] for r in rows]
    for key, th in zip(WUPS_KEYS, WUPS_THRESHOLDS, strict=True):
        if wups:
            type_head += [f"{wups_label(th)} {t}" for t in types]
            for cells, r in zip(type_body, rows, strict=True):
                cells += [_pct(r[f"{key}/{t}"]) for t in types]
    lines += ["", "## Per question type (%)", "", *_table(type_head, type_body)]
    train_head = ["variant", "val acc %", "prior %", "epochs", "steps", "trainable params", "wall s"]
    train_body = [
        [
            f"`{r['variant']}`",
            _pct(r[VAL_ACC]),
            _pct(r[TEST_PRIOR_ACC]),
            f"{float(r['epochs']):g}" if r["epochs"] else "",
            f"{r['steps']:.0f}" if r["steps"] else "",
            f"{r['trainable_params']:,.0f}" if r["trainable_params"] else "",
            f"{r['wall_s']:.0f}" if r["wall_s"] else "",
        ]
        for r in rows
    ]
    lines += ["", "## Training", "", *_table(train_head, train_body)]
    if skipped:
        lines += ["", f"Not in the table (not finished or without test metrics): {', '.join(skipped)}."]
    lines += ["", "![comparison](comparison.png)", "", "![learning curves](learning_curves.png)", ""]
    path.write_text("\n".join(lines))


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "<": r"\textless{}", ">": r"\textgreater{}"}  # fmt: skip


def latex_escape(text: str) -> str:
    """``text`` as LaTeX typesets it literally (variant names hold ``_``, and may hold ``%``, ``&``, ``#``...)."""
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_title(title: str) -> str:
    """The Markdown title in LaTeX: its `code` spans set in \\texttt."""
    parts = title.split("`")
    return "".join(f"\\texttt{{{latex_escape(p)}}}" if i % 2 else latex_escape(p) for i, p in enumerate(parts))


def write_latex(rows: list[dict], path: Path, title: str) -> None:
    """The main comparison as a booktabs table (``\\usepackage{booktabs}``): accuracy with its 95% interval, WUPS,
    the paired difference from the baseline with its interval and Holm-adjusted p, ``$^{*}$`` where significant."""
    wups = any(r[k] is not None for r in rows for k in WUPS_KEYS)
    paper = any(r["paper_acc"] is not None for r in rows)
    base = next((r["baseline"] for r in rows if r.get("baseline")), None)
    head = ["Variant", "$n$", "Acc.\\ (\\%)", "95\\% CI"]
    head += [f"{wups_label(th)} (\\%)" for th in WUPS_THRESHOLDS] if wups else []
    head += ["$\\Delta$ (points)", "95\\% CI of $\\Delta$", "$p$ (Holm)"] if base else []
    head += ["Paper (\\%)"] if paper else []
    body = []
    for r in rows:
        acc = _pct(r[TEST_ACC]) + (f" $\\pm$ {100 * r['sd']:.1f}" if r["sd"] is not None else "")
        cells = [f"\\texttt{{{latex_escape(r['variant'])}}}", str(r["n"]), acc]
        cells.append(f"{_pct(r['ci_low'])}--{_pct(r['ci_high'])}")
        cells += [_pct(r[k]) for k in WUPS_KEYS] if wups else []
        if base and r["variant"] == base:
            cells += ["baseline", "", ""]
        elif base:
            mark = "$^{*}$" if r["significant"] else ""
            diff = "" if r["diff"] is None else f"${100 * r['diff']:+.1f}${mark}"
            ci = "" if r["diff"] is None else f"${100 * r['diff_low']:+.1f}$ to ${100 * r['diff_high']:+.1f}$"
            p = "" if math.isnan(r["p_holm"]) else "$<10^{-4}$" if r["p_holm"] < 1e-4 else f"{r['p_holm']:.2g}"
            cells += [diff, ci, p]
        cells += [_pct(r["paper_acc"])] if paper else []
        body.append(" & ".join(cells) + " \\\\")
    caption = f"{_latex_title(title)}. Test accuracy over the full test split with its 95\\% interval."
    if base:
        caption += (
            f" $\\Delta$: accuracy minus that of \\texttt{{{latex_escape(base)}}} on the same questions (exact "
            f"McNemar test for single runs, paired $t$ over seeds); $p$ Holm-adjusted; $^{{*}}$: $p < {ALPHA:g}$."
        )
    lines = [
        "% clipqa-report: the main comparison. Needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{caption}}}",
        "\\label{tab:clipqa-comparison}",
        f"\\begin{{tabular}}{{l{'r' * (len(head) - 1)}}}",
        "\\toprule",
        " & ".join(head) + " \\\\",
        "\\midrule",
        *body,
        "\\bottomrule",
        "\\end{tabular}",
        "\\end{table}",
        "",
    ]
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict], path: Path) -> None:
    fields = [k for k in rows[0] if not k.startswith("_")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def pareto_section(client, runs: list, parent_run_id: str | None, out: Path) -> list[str]:
    """For a multi-objective Optuna study (its front's runs tagged ``clipqa.pareto_front``): a table of the front,
    one row per run on it, with the study's objectives (from the parent's ``optuna/optimization_results.yaml``), and
    the sweeper's ``pareto_front.png`` copied beside the report."""
    import yaml

    front = [r for r in runs if r.data.tags.get("clipqa.pareto_front") == "true"]
    if not front:
        return []
    names, directions = ["val/acc"], ["maximize"]
    if parent_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results = client.download_artifacts(parent_run_id, "optuna/optimization_results.yaml", tmp)
                study = yaml.safe_load(Path(results).read_text())
                names, directions = list(study["metric_names"]), list(study["directions"])
                plot = client.download_artifacts(parent_run_id, "optuna/pareto_front.png", tmp)
                shutil.copy(plot, out / "pareto_front.png")
            except Exception:  # an older study, or a front without a plot (more than two objectives)
                pass
    front.sort(key=lambda r: r.data.metrics.get(names[0], float("nan")), reverse=directions[0] == "maximize")
    head = ["run", *[f"{n} ({d[:3]})" for n, d in zip(names, directions, strict=True)]]
    body = [[f"`{r.info.run_name}`", *[f"{r.data.metrics.get(n, float('nan')):.4g}" for n in names]] for r in front]
    lines = ["", f"## Pareto front ({len(front)} of {len(runs)} trials)", "", *_table(head, body)]
    if (out / "pareto_front.png").is_file():
        lines += ["", "![Pareto front](pareto_front.png)"]
    return lines
