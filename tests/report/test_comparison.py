"""The comparison report: rows per variant and seed aggregation, WUPS columns, the paired comparison with a baseline
(exact McNemar, Agresti-Min interval, paired t over seeds, Holm), all checked against numbers computed by hand."""

import csv
import math
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clipqa.errors import ClipqaError
from clipqa.report.comparison import make_report
from clipqa.report.paired import mcnemar_counts, read_correctness
from clipqa.report.statistics import holm, mcnemar_exact, paired_difference, t_two_sided_p, wilson
from tests.helpers.runs import mlflow_store

TYPES = ["object", "number", "color", "location"]


def fake_run(client, exp_id, name, params, acc, parent=None, correct=None, tags=None, metrics=None):
    """A finished MLflow run with the metrics a training run logs; ``correct`` (one bool per test question) also
    logs a test_predictions.tsv artifact with those answers right."""
    r = client.create_run(
        exp_id, run_name=name, tags={**({"mlflow.parentRunId": parent} if parent else {}), **(tags or {})}
    )
    for k, v in params.items():
        client.log_param(r.info.run_id, k, v)
    n = len(correct) if correct is not None else 1000
    base = {"test/acc": acc, "val/acc": acc, "test/prior_acc": 0.1, "data/n_test": n, "data/n_test_evaluated": n}
    base |= {f"test/acc/{t}": acc for t in TYPES} | {"params/trainable": 1e6}
    for k, v in {**base, **(metrics or {})}.items():
        client.log_metric(r.info.run_id, k, v, step=1)
    if correct is not None:
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "test_predictions.tsv"
            rows = ["image_id\ttype\tquestion\tanswer\tprediction\tcorrect"]
            for i, ok in enumerate(correct):
                # question 0 and 1 are the same question about the same image: told apart by their order
                q = "what is it" if i < 2 else f"question {i}"
                rows.append(f"{100 + (i if i >= 2 else 0)}\tobject\t{q}\tcat\t{'cat' if ok else 'dog'}\t{int(ok)}")
            f.write_text("\n".join(rows) + "\n")
            client.log_artifact(r.info.run_id, str(f))
    client.set_terminated(r.info.run_id)
    return r.info.run_id


def main_table(md: str) -> list[list[str]]:
    """The cells of the report's first table (one list per row, header excluded)."""
    lines = md.split("\n\n")[1].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


# ---- statistics against hand computation (and scipy) ------------------------------------------------------------
def test_exact_mcnemar_matches_hand_computed_binomial_tails():
    # b=1, c=6: 7 discordant; P[X <= 1] = (1 + 7) / 2^7 = 8/128, two-sided 16/128
    assert mcnemar_exact(1, 6) == pytest.approx(16 / 128, rel=1e-12)
    assert mcnemar_exact(6, 1) == pytest.approx(16 / 128, rel=1e-12)  # symmetric
    # b=2, c=10: P[X <= 2] = (1 + 12 + 66) / 4096; two-sided 158/4096
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(7, 7) == 1.0  # no evidence either way (capped at 1)


def test_exact_mcnemar_agrees_with_scipy_binomtest_also_for_coco_qa_sized_counts():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 6), (2, 10), (13, 30), (480, 560), (2400, 2510), (0, 40)]:
        expected = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_difference_and_its_agresti_min_interval_by_hand():
    # b=2, c=10 over 100 questions: d = 8/100; half a question added to each cell: b'=2.5, c'=10.5, n'=102,
    # d' = 8/102 = 0.078431, se = sqrt(13 - 64/102) / 102 = 0.034485, 95%: 0.078431 +- 0.067590
    d, lo, hi = paired_difference(2, 10, 100)
    assert d == pytest.approx(0.08)
    assert lo == pytest.approx(0.010841, abs=1e-5) and hi == pytest.approx(0.146022, abs=1e-5)
    d, lo, hi = paired_difference(0, 0, 50)  # identical answers: Δ 0 with an interval that is not empty
    assert d == 0 and lo < 0 < hi


def test_t_p_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t in (0.0, 0.5, 1.7, 3.2, 12.0, -2.5):
        for df in (1, 2, 3, 4, 5, 9):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-12)


def test_holm_adjusts_in_order_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([float("nan"), 0.02, 0.5])  # no comparison (the baseline) does not count
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.04, 0.5])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1; 0.9 x 1 kept monotone: 1


def test_correctness_pairs_questions_by_content_not_line_number(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    head = "image_id\ttype\tquestion\tanswer\tprediction\tcorrect\textra\n"
    a.write_text(head + "1\tobject\tq\tcat\tcat\t1\tx\n1\tobject\tq\tcat\tdog\t0\tx\n2\tcolor\tr\tred\tred\t1\tx\n")
    b.write_text(head + "2\tcolor\tr\tred\tblue\t0\tx\n1\tobject\tq\tcat\tcat\t1\tx\n1\tobject\tq\tcat\tcat\t1\tx\n")
    # question 2 only a right (b=1); the second asking of q only b right (c=1)
    assert mcnemar_counts(read_correctness(a), read_correctness(b)) == (1, 1, 3)
    bad = tmp_path / "bad.tsv"
    bad.write_text("image_id\tprediction\n1\tcat\n")
    with pytest.raises(ClipqaError, match="correct"):
        read_correctness(bad)


def test_wilson_interval_brackets_the_accuracy():
    lo, hi = wilson(0.5, 80)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.21, abs=0.01)  # the paper's +-11 points


# ---- reports from MLflow runs -----------------------------------------------------------------------------------
def test_report_aggregates_seeds_and_keeps_one_row_per_variant(tmp_path):
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("r", artifact_location=(tmp_path / "art").as_uri())
    for layers, seed, acc in [(0, 1, 0.30), (0, 2, 0.34), (2, 1, 0.50), (2, 2, 0.54), (2, 3, 0.52)]:
        fake_run(
            c,
            exp,
            f"mapper.num_layers={layers},trainer.seed={seed}",
            {"mapper.num_layers": layers, "trainer.seed": seed, "trainer.epochs": 1},
            acc,
            tags={"hydra.job.num": str(3 * layers + seed)},
        )
    failed = c.create_run(exp, run_name="broken")
    c.set_terminated(failed.info.run_id, "FAILED")
    out = tmp_path / "rep"
    md = make_report(uri, out, experiment="r").read_text()
    rows = main_table(md)
    assert [r[:3] for r in rows] == [
        ["`mapper.num_layers=0`", "2", "32.0 ± 2.8"],
        ["`mapper.num_layers=2`", "3", "52.0 ± 2.0"],
    ]
    # 52 +- t(0.975, 2) * 2.0 / sqrt(3) = 52 +- 4.30 * 1.155 = 52 +- 4.97
    assert rows[1][3] == "47.0–57.0"
    # vs the first job (mapper.num_layers=0): the seeds 1 and 2 they share, differences 0.20 and 0.20: a paired t
    # with sd 0 -> p 0; Δ +20.0
    assert rows[0][4] == "baseline" and rows[1][4] == "+20.0" and "paired t, 2 seeds" in rows[1][7]
    assert "broken (FAILED)" in md
    table = list(csv.DictReader((out / "report.csv").open()))
    assert len(table) == 2 and list(table[0])[:3] == ["variant", "n", "test/acc"]
    assert (out / "comparison.png").stat().st_size > 5000 and (out / "learning_curves.png").is_file()


def test_runs_that_differ_only_by_seed_are_one_row(tmp_path):
    """conf/sweep/seeds.yaml: nothing but trainer.seed varies, so every run is one variant (n=3), whatever its name."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    for seed, acc in [(1, 0.50), (2, 0.54), (3, 0.52)]:
        fake_run(c, exp, f"trainer.seed={seed}", {"mapper.num_layers": 1, "trainer.seed": seed}, acc)
    rows = main_table(make_report(uri, tmp_path / "rep", experiment="s").read_text())
    assert len(rows) == 1
    assert rows[0][:4] == ["`same config (seeds 1, 2, 3)`", "3", "52.0 ± 2.0", "47.0–57.0"]


def test_paper_report_compares_every_version_with_v1_paired_with_holm(tmp_path):
    """V1..V4 with known per-question correctness over 60 questions; b/c, p and Holm worked out by hand."""
    uri = mlflow_store(tmp_path)
    c = MlflowClient(uri)
    exp = c.create_experiment("p", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, run_name="sweep: paper", tags={"clipqa.sweep": "true"}).info.run_id
    n = 60
    v1 = [i < 20 for i in range(n)]  # 20 right
    v2 = [i < 18 or 20 <= i < 40 for i in range(n)]  # loses 2 of V1's, gains 20: b=2, c=20
    v3 = [i < 20 or 20 <= i < 23 for i in range(n)]  # gains 3: b=0, c=3
    v4 = [i >= 1 and i < 21 for i in range(n)]  # loses question 0, gains question 20: b=1, c=1
    for i, (name, correct) in enumerate(zip(["V1", "V2", "V3", "V4"], [v1, v2, v3, v4], strict=True)):
        wups = {"test/wups_0.9": 0.4 + 0.01 * i, "test/wups_0.0": 0.8 + 0.01 * i}
        fake_run(
            c,
            exp,
            name,
            {"mapper.num_layers": 0 if i == 0 else 2, "trainer.epochs": 1 + max(0, i - 1)},
            sum(correct) / n,
            parent,
            correct=correct,
            metrics=wups,
            tags={"hydra.job.num": str(i)},
        )
    fake_run(c, exp, "elsewhere", {"mapper.num_layers": 5}, 0.9)  # not in this sweep
    out = tmp_path / "rep"
    md = make_report(uri, out, experiment="p", parent_run_id=parent).read_text()
    assert "paper acc % (80 q)" in md and "80 test questions" in md and "elsewhere" not in md
    head = md.split("\n\n")[1].splitlines()[0]
    assert "WUPS@0.9 %" in head and "WUPS@0.0 %" in head and "Δ acc vs `V1` (points)" in head
    rows = {r[0]: r for r in main_table(md)}
    assert list(rows) == ["`V1`", "`V2`", "`V3`", "`V4`"]
    assert rows["`V2`"][4:6] == ["41.0", "81.0"] and rows["`V2`"][-1] == "51.3"
    # raw p: V2 2 (1 + 22 + 231) / 2^22 = 508/4194304, V3 2/8 = 0.25, V4 1.0;
    # Holm (m=3): V2 x 3 = 3.6e-4, V3 0.25 x 2 = 0.5, V4 1.0 -> only V2 significant
    table = {r["variant"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert (table["V2"]["b"], table["V2"]["c"], table["V2"]["n_paired"]) == ("2", "20", "60")
    assert float(table["V2"]["p"]) == pytest.approx(508 / 4194304)
    assert [float(table[v]["p_holm"]) for v in ("V2", "V3", "V4")] == pytest.approx([3 * 508 / 4194304, 0.5, 1.0])
    assert float(table["V2"]["diff"]) == pytest.approx(18 / 60)
    assert table["V1"]["baseline"] == "V1" and table["V1"]["p_holm"] == "nan"
    # Agresti-Min: d' = 18.0/62 = 0.2903, se = sqrt(23 - 18^2/62)/62 = 0.0680, 95%: 0.157 to 0.424
    assert rows["`V2`"][6:9] == ["+30.0", "+15.7 to +42.4", "0.00036 **\\***"]
    assert "McNemar (b=2, c=20, 60 q)" in rows["`V2`"][9]
    assert [rows[f"`{v}`"][8] for v in ("V3", "V4")] == ["0.5", "1"]
    assert "## Per question type (%)" in md and "WUPS@0.9 object" in md and "## Training" in md

    # --baseline: another row is the reference. Against V4 (questions 1..20): V2 b=2 (18, 19), c=20 (0, 21..39),
    # V1 b=1, c=1, V3 b=0, c=3
    v4_id = next(r.info.run_id for r in c.search_runs([exp]) if r.info.run_name == "V4")
    md = make_report(uri, tmp_path / "rep2", experiment="p", parent_run_id=parent, baseline_run_id=v4_id).read_text()
    rows = {r[0]: r for r in main_table(md)}
    assert rows["`V4`"][6] == "baseline" and rows["`V2`"][6] == "+30.0" and rows["`V1`"][6] == "+0.0"
    assert "(b=1, c=1, 60 q)" in rows["`V1`"][9] and rows["`V2`"][8].endswith("**\\***")
    with pytest.raises(ClipqaError, match="--baseline nope"):
        make_report(uri, tmp_path / "rep3", experiment="p", parent_run_id=parent, baseline_run_id="nope")


def test_report_without_matching_runs_is_a_clear_error(tmp_path):
    uri = mlflow_store(tmp_path)
    MlflowClient(uri).create_experiment("empty")
    with pytest.raises(ClipqaError, match="No finished runs"):
        make_report(uri, tmp_path / "rep", experiment="empty")
    with pytest.raises(ClipqaError, match="No MLflow experiment 'nope'"):
        make_report(uri, tmp_path / "rep", experiment="nope")


# a subprocess (~2.5 s): slow
@pytest.mark.slow
def test_report_against_a_server_that_is_down_fails_fast_with_one_line(tmp_path):
    """clipqa-report once waited 4 minutes in MLflow's HTTP retries and then printed a traceback."""
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers.mlflow_server import free_port

    exe = shutil.which("clipqa-report", path=str(Path(sys.executable).parent)) or shutil.which("clipqa-report")
    started = time.time()
    r = subprocess.run(
        [exe, "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and time.time() - started < 60
    assert "Cannot reach the MLflow tracking server" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "report.md").exists()
