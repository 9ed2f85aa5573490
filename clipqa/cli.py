"""The command-line tools besides ``train.py``: ``clipqa-cache``, ``clipqa-report``, ``clipqa-eval``,
``clipqa-predict``, ``clipqa-download``, ``clipqa-sync`` and ``clipqa-demo-data``. Each prints a user-fixable
problem as one ``<tool>: error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from clipqa.errors import ClipqaError
from clipqa.paths import CONF_DIR


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def cache(argv: list[str] | None = None) -> None:
    """``clipqa-cache [OVERRIDES]``: build (or find) the feature cache a run with these overrides would use.

    Run it once before a sweep (e.g. on the login node's GPU, or as the first SLURM job) so the sweep's jobs all
    start from a finished store; they would otherwise build it themselves, one building while the others wait. A
    named sweep is an override as for train.py (``clipqa-cache sweep=freeze experiment=demo``): its base config,
    the one its jobs share before the swept keys apply.
    """
    parser = argparse.ArgumentParser(
        prog="clipqa-cache",
        description="Encode every image of the configured dataset with the frozen CLIP tower once, into the "
        "feature cache that training runs and sweep jobs reuse. Takes the same overrides as train.py.",
        epilog="examples: clipqa-cache experiment=demo | clipqa-cache sweep=mapper_depth experiment=demo | "
        "clipqa-cache data.root=D data.image_root=I image_tokens=cls",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (key=value; sweep=NAME)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _fail("clipqa-cache", _old_config_flags(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    if not (CONF_DIR / "config.yaml").is_file():
        _fail("clipqa-cache", f"cannot find the config folder {CONF_DIR} (install clipqa with pip install -e).")
    from hydra import compose, initialize_config_dir

    from clipqa.config import validate
    from clipqa.models.backbones import load_backbone
    from clipqa.training.device import pick_device
    from clipqa.training.loaders import feature_store, load_data
    from clipqa.training.schedule import resolve_phases

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = validate(compose("config", overrides=list(args.overrides)))
        if not all(p.freeze["vision"] for p in resolve_phases(cfg)):
            raise ClipqaError("this config trains the vision tower, so its runs do not use the feature cache.")
        train_split, val_split, test_split, index = load_data(cfg)
        backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir, train_split.questions + train_split.answers)
        t0 = time.perf_counter()
        splits = [train_split, val_split, test_split]
        store = feature_store(cfg, backbone, splits, index, pick_device(cfg.trainer.device))
    except ClipqaError as e:
        _fail("clipqa-cache", str(e))
    except Exception as e:  # a malformed override, an unknown config group
        _fail("clipqa-cache", f"{type(e).__name__}: {e}")
    n_bad = len(store.bad)
    print(
        f"feature cache: {store.folder}\n"
        f"  {len(store.rows)} images ({n_bad} unreadable, skipped), {len(store.rows) - n_bad} encoded, "
        f"{store.shape[0]} tokens x {store.shape[1]} ({store.dtype}) each\n"
        f"  size {store.nbytes() / 2**20:.1f} MiB, ready in {time.perf_counter() - t0:.1f} s"
    )


def _old_config_flags(argv: list[str]) -> str:
    """The error for flags clipqa-cache does not take; for the gone ``-cd DIR -cn NAME``, the command to type now."""
    rest, sweep, flags = [], None, {"-cd", "--config-dir", "-cn", "--config-name"}
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in flags:
            value = value if eq else next(args, "")
            sweep = value if flag in ("-cn", "--config-name") else sweep
        elif arg.startswith("-"):
            return f"unrecognized argument {arg} (clipqa-cache takes Hydra overrides only, as train.py does)."
        else:
            rest.append(arg)
    new = " ".join(["clipqa-cache", *([f"sweep={sweep}"] if sweep else []), *rest])
    return f"-cd/--config-dir and -cn are gone: a named sweep is an override, as for train.py. Use: {new}"


def report(argv: list[str] | None = None) -> None:
    """``clipqa-report``: the comparison report (report.md, report.csv, report.tex, charts) from MLflow runs, or from
    the job folders of a sweep run with tracking off."""
    from clipqa.report.comparison import REPORT_FILES, make_folder_report, make_report
    from clipqa.tracking.preflight import fail_fast_http, server_errors
    from clipqa.tracking.run_info import PARENT_FILE, read_parent
    from clipqa.tracking.uris import resolve_uri

    p = argparse.ArgumentParser(
        prog="clipqa-report",
        description="Compare MLflow runs, or an untracked sweep's job folders: write report.md, report.csv, "
        "report.tex and the charts.",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)",
    )
    p.add_argument("--experiment", default="clipqa", help="MLflow experiment name")
    p.add_argument("--out", required=True, help="folder for report.md, report.csv, report.tex, comparison.png")
    p.add_argument("--parent", default=None, help="only the runs nested under this parent (sweep) run id")
    p.add_argument(
        "--sweep-dir",
        default=None,
        help=f"only the runs of the Hydra sweep in this folder: its MLflow runs ({PARENT_FILE}), else, for a sweep "
        "run with tracking off, its job folders (metrics.json, test_predictions.tsv, .hydra/overrides.yaml)",
    )
    p.add_argument("--filter", default=None, help="an MLflow filter string, e.g. \"params.head.kind = 'vocab'\"")
    p.add_argument(
        "--baseline",
        default=None,
        help="run id (for job folders: the job's folder, e.g. 0) whose row every other row is compared with "
        "(default: V1 of the paper's versions, else the sweep's first job)",
    )
    a = p.parse_args(argv)
    parent = a.parent
    info = read_parent(a.sweep_dir) if a.sweep_dir else None
    try:
        if a.sweep_dir and info is None:  # an untracked sweep: read its job folders, no MLflow
            if a.parent or a.filter:
                raise ClipqaError(
                    f"{a.sweep_dir} is a sweep run with tracking off (no {PARENT_FILE}): its report is made from "
                    "its job folders, which --parent and --filter (MLflow selections) do not apply to. Leave them "
                    "out, or pass --parent/--filter without --sweep-dir to report MLflow runs."
                )
            path = make_folder_report(a.sweep_dir, a.out, baseline_run_id=a.baseline)
        else:
            parent = info["run_id"] if info else parent
            uri = resolve_uri(a.tracking_uri, "--tracking-uri", must_exist=True)
            fail_fast_http()
            with server_errors(uri, a.experiment, access="read", outcome="No report was written."):
                path = make_report(
                    uri,
                    a.out,
                    experiment=a.experiment,
                    parent_run_id=parent,
                    filter_string=a.filter,
                    baseline_run_id=a.baseline,
                )
    except ClipqaError as e:
        _fail("clipqa-report", str(e))
    print(path.read_text().split("\n\n![")[0])
    print(f"\nwrote {', '.join(str(path.with_name(f)) for f in REPORT_FILES)}")


def sync(argv: list[str] | None = None) -> None:
    """``clipqa-sync RUN_FOLDER``: upload the MLflow writes a run could not make while the server was away."""
    from clipqa.tracking.pending import PENDING_FILE
    from clipqa.tracking.pending import sync as upload

    p = argparse.ArgumentParser(prog="clipqa-sync", description=sync.__doc__.split(": ", 1)[1])
    p.add_argument("run_folder", help=f"the run's output folder (holds {PENDING_FILE})")
    a = p.parse_args(argv)
    if not (Path(a.run_folder) / PENDING_FILE).is_file():
        _fail("clipqa-sync", f"{Path(a.run_folder) / PENDING_FILE} not found: nothing to upload.")
    try:
        print(f"uploaded {upload(a.run_folder)} MLflow writes from {a.run_folder}")
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        _fail("clipqa-sync", f"{Path(a.run_folder) / PENDING_FILE} is not a pending-writes file ({e}).")


def evaluate(argv: list[str] | None = None) -> None:
    """``clipqa-eval CHECKPOINT``: re-score a trained model on a split; writes metrics.json and the predictions."""
    p = argparse.ArgumentParser(
        prog="clipqa-eval",
        description="Evaluate a trained model on every question of a split: accuracy per COCO-QA type, loss, the "
        "answer prior; writes metrics.json and <split>_predictions.tsv.",
        epilog="CHECKPOINT: a best.pt, a run folder, runs:/<run_id> or models:/<name>/<version>",
    )
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--data-root", default=None, help="another COCO-QA-format folder (default: the run's data)")
    p.add_argument("--image-root", default=None, help="its COCO images (train2014/, val2014/)")
    p.add_argument("--out", default=None, help="output folder (default: eval-<split> beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's trainer.eval_batch_size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from clipqa.inference.trained import evaluate_checkpoint, find_checkpoint, load_trained, write_evaluation

    if a.batch_size is not None and a.batch_size <= 0:
        _fail("clipqa-eval", f"--batch-size {a.batch_size}: pass a positive number.")
    try:
        with tempfile.TemporaryDirectory(prefix="clipqa-eval-") as tmp:
            path = find_checkpoint(a.checkpoint, a.tracking_uri, Path(tmp))
            trained = load_trained(path, a.device)
            metrics, chosen, preds = evaluate_checkpoint(trained, a.split, a.data_root, a.image_root, a.batch_size)
            remote = a.checkpoint.startswith(("runs:/", "models:/"))
            out = Path(a.out) if a.out else (Path("eval") if remote else path.parent) / f"eval-{a.split}"
            files = write_evaluation(out, a.split, metrics, chosen, preds, trained.labels.classes)
    except ClipqaError as e:
        _fail("clipqa-eval", str(e))
    shown = {k: v for k, v in metrics.items() if k.startswith(f"{a.split}/")}
    print("\n".join(f"{k:28s} {v:.4f}" for k, v in shown.items() if v == v))
    print(f"{len(preds)} of {len(chosen)} questions evaluated; wrote {files[0]} and {files[1]}")


def predict(argv: list[str] | None = None) -> None:
    """``clipqa-predict CHECKPOINT --image PATH --question TEXT``: the top-k answers with their probabilities."""
    p = argparse.ArgumentParser(
        prog="clipqa-predict",
        description="Answer questions about pictures with a trained model: the top-k answers and probabilities.",
        epilog="CHECKPOINT: a best.pt, a run folder, runs:/<run_id> or models:/<name>/<version>",
    )
    p.add_argument("checkpoint")
    p.add_argument("--image", default=None, help="the picture the --question(s) ask about")
    p.add_argument("--question", action="append", default=[], help="a question (repeat for several)")
    p.add_argument("--questions", default=None, help="a file of IMAGE<TAB>QUESTION lines")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per question, for scripts")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)",
    )
    a = p.parse_args(argv)
    items = [(a.image, q) for q in a.question]
    if a.question and not a.image:
        _fail("clipqa-predict", "--question needs --image (the picture it asks about).")
    if a.questions:
        items += _read_questions(a.questions)
    if not items:
        _fail("clipqa-predict", "nothing to answer: pass --image PATH --question TEXT, or --questions FILE.")
    if a.top_k < 1:
        _fail("clipqa-predict", f"--top-k {a.top_k}: pass 1 or more.")
    for image, _ in items:  # before the model loads: a typo should not cost its loading time
        if not Path(image).is_file():
            _fail("clipqa-predict", f"Image not found: {image}. Pass the path of a JPEG or PNG file.")
    from clipqa.inference.trained import answer, find_checkpoint, load_trained

    try:
        with tempfile.TemporaryDirectory(prefix="clipqa-predict-") as tmp:
            trained = load_trained(find_checkpoint(a.checkpoint, a.tracking_uri, Path(tmp)), a.device)
            results = answer(trained, items, a.top_k)
    except ClipqaError as e:
        _fail("clipqa-predict", str(e))
    for (image, question), top in zip(items, results, strict=True):
        if a.json:
            answers = [{"answer": ans, "probability": prob} for ans, prob in top]
            print(json.dumps({"image": str(image), "question": question, "answers": answers}))
        else:
            print(f"{image}: {question}")
            print("\n".join(f"  {prob:6.1%}  {ans}" for ans, prob in top))


def _read_questions(path: str) -> list[tuple[str, str]]:
    file = Path(path)
    if not file.is_file():
        _fail("clipqa-predict", f"--questions {path}: no such file.")
    items = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        image, tab, question = line.partition("\t")
        if not tab or not question.strip():
            _fail("clipqa-predict", f"{path} line {n}: expected IMAGE<TAB>QUESTION, got {line[:80]!r}.")
        items.append((image.strip(), question.strip()))
    return items


def download(argv: list[str] | None = None) -> None:
    """``clipqa-download --to DIR``: fetch COCO-QA and the COCO 2014 images, verified, then print the overrides."""
    from clipqa.data.download import ARCHIVES, COCO_URL, COCOQA_URL, MIRROR_ENV, download_datasets, targets

    p = argparse.ArgumentParser(
        prog="clipqa-download",
        description="Download COCO-QA and the COCO 2014 images (about 20 GB; resumable), verify and extract them.",
        epilog=f"Official locations: {COCOQA_URL} and {COCO_URL}{{train2014,val2014}}.zip; ${MIRROR_ENV}=BASE_URL "
        "takes all three from a local mirror.",
    )
    p.add_argument("--to", required=True, help="folder for cocoqa/ (data.root) and coco/ (data.image_root)")
    p.add_argument("--what", default=",".join(ARCHIVES), help=f"archives to fetch (default: {','.join(ARCHIVES)})")
    p.add_argument("--keep-zips", action="store_true", help="keep the archives after extracting them")
    p.add_argument("--only-referenced", action="store_true", help="extract only the images COCO-QA's questions use")
    p.add_argument("--force", action="store_true", help="fetch and replace what is already there")
    p.add_argument("--cocoqa-url", default=None, help="the COCO-QA archive's URL (a mirror)")
    p.add_argument("--coco-url", default=None, help="a base URL serving train2014.zip and val2014.zip")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed download (exponential backoff)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        lines = download_datasets(
            a.to,
            [w.strip() for w in a.what.split(",") if w.strip()],
            cocoqa_url=a.cocoqa_url,
            coco_url=a.coco_url,
            keep_zips=a.keep_zips,
            only_referenced=a.only_referenced,
            force=a.force,
            retries=a.retries,
            timeout_s=a.timeout,
        )
    except ClipqaError as e:
        _fail("clipqa-download", str(e))
    except KeyboardInterrupt:
        _fail("clipqa-download", "interrupted; run the same command again to resume the download.")
    print("\n".join(lines))
    where = targets(Path(a.to).expanduser().resolve())
    print(f"\ntrain with:\n  python train.py data.root={where['cocoqa']} data.image_root={where['train2014'].parent}")


def demo_data(argv: list[str] | None = None) -> None:
    """``clipqa-demo-data --out DIR``: write the synthetic COCO-QA-format demo dataset to a folder."""
    from clipqa.data.demo import generate

    p = argparse.ArgumentParser(prog="clipqa-demo-data", description="Write the synthetic COCO-QA-format demo dataset.")
    p.add_argument("--out", required=True, help="folder to create (data.root; images go to OUT/images)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        p.error(f"{out} already exists; choose a new folder")
    generate(out, a.n_train, a.n_test, a.seed, a.image_size)
    print(f"wrote {out}: train with python train.py data.root={out} data.image_root={out / 'images'} backbone=tiny")


if __name__ == "__main__":  # python -m clipqa.cli {cache,report,sync,demo-data} ...
    tools = {
        "cache": cache,
        "report": report,
        "sync": sync,
        "demo-data": demo_data,
        "eval": evaluate,
        "predict": predict,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in tools:
        _fail("python -m clipqa.cli", f"name a tool: {', '.join(tools)}")
    tools[sys.argv[1]](sys.argv[2:])
