"""The run function: one training run from a composed config to ``metrics.json`` and ``best.pt``.

``train(cfg, output_dir)`` is what ``train.py`` (the Hydra entry point) calls and what tests call directly. It
reads top to bottom:

1. validate the config (typed boundary); skip a finished run; find a resume checkpoint; start the tracker
2. set up: seed, device, data, backbone, labels, model, feature cache, loaders   (:mod:`~clipqa.training.device`,
   :mod:`~clipqa.training.loaders`, :mod:`~clipqa.training.build`)
3. train phase by phase, validating and keeping the best weights                       (:mod:`clipqa.training.loop`)
4. write metrics.json, config.yaml, history.jsonl, test_predictions.tsv, curves and best.pt
5. log the final metrics and files to the tracker and end its run FINISHED, FAILED or KILLED
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipqa import metrics as M
from clipqa.config import is_validated, validate
from clipqa.data.cocoqa import Split
from clipqa.errors import ClipqaError, Preempted
from clipqa.evaluation.scoring import json_safe, write_predictions
from clipqa.evaluation.wups import split_wups
from clipqa.models.backbones import load_backbone
from clipqa.report.plots import save_curves
from clipqa.tracking.run_info import RunInfo
from clipqa.tracking.tracker import Tracker, flatten, make_tracker
from clipqa.training.build import build_model
from clipqa.training.checkpoint import latest_resume, load_init, same_run, save_best
from clipqa.training.device import claim_device, compile_model, keep_freed_memory, resolve_precision, seed_everything
from clipqa.training.loaders import build_labels, build_loaders, load_data, warn_long_questions
from clipqa.training.loop import Trainer
from clipqa.training.schedule import PARTS, resolve_phases
from clipqa.training.signals import stop_on_signals
from clipqa.training.state import TrainState

log = logging.getLogger(__name__)

DONE_MARKER = ".clipqa_done"  # written after every file and every MLflow write of a finished run
RUN_ID_FILE = "mlflow_run_id.txt"  # a run folder remembers its MLflow run: a restart continues it


def train(
    cfg: DictConfig,
    output_dir: str | Path,
    info: RunInfo | None = None,
    on_validation=None,
    tracker: Tracker | None = None,
) -> dict[str, float]:
    """Run one training job; write metrics.json / config.yaml / best.pt into ``output_dir``; return the metrics.

    ``info`` places the run in its Hydra sweep (for tracking: run name, parent run); ``train.py`` passes it.
    ``on_validation(val_acc, step)`` is called after every validation (Optuna pruning raises TrialPruned there).
    ``tracker`` replaces the one ``tracking.*`` would make (benchmarks/throughput.py records step timings with it).
    The tracked run ends FINISHED, FAILED (with the error message as tag ``error``) or KILLED (Ctrl-C, SIGTERM, or a
    pruned trial, tagged ``clipqa.pruned``).
    """
    cfg = cfg if is_validated(cfg) else validate(cfg)
    out = Path(output_dir)
    check_writable(out, "the run folder (hydra.run.dir / hydra.sweep.dir)")
    if cfg.data.synthetic is not None or cfg.backbone.tiny is not None:
        check_writable(Path(cfg.paths.cache_dir).expanduser(), "paths.cache_dir (or $CLIPQA_CACHE_DIR)")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resumed = None
    if cfg.trainer.resume == "auto":
        if (finished := finished_metrics(out, resolved)) is not None:
            log.info("%s already holds this run's results; not training again <trainer.resume=auto>", out)
            return finished
        resumed = latest_resume(out, resolved)
    info = info or RunInfo()
    if tracker is None:
        tracker = make_tracker(cfg, info, run_id=previous_run_id(out, cfg, resumed))
    if tracker.run_id:
        (out / RUN_ID_FILE).write_text(tracker.run_id)
    if resumed is not None:  # continuing a run a signal stopped: it is no longer waiting to be resumed
        tracker.set_tags({"clipqa.resumable": "false"})
    with stop_on_signals() as stop:  # SIGTERM (preemption) or SIGUSR2 (time limit): checkpoint, stop
        try:
            t = cfg.trainer
            with claim_device(t.device, cfg.paths.cache_dir, t.gpu_lease, str(out), stop) as device:
                results = _run(cfg, out, resolved, tracker, info, on_validation, resumed, stop, device)
        except BaseException as e:
            end_tracked_run(tracker, e, out)
            raise
    tracker.finish("FINISHED", run_dir=out)
    (out / DONE_MARKER).write_text("finished\n")  # last of all: a re-run of this folder skips the run
    return results


def _run(cfg, out: Path, resolved: dict, tracker: Tracker, info: RunInfo, on_validation, resumed, stop, device) -> dict:
    # 1. seed, precision (the device is claimed by the caller: a GPU lease lasts the whole run) ----------------------
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in DataLoader workers instead
    t = cfg.trainer
    seed_everything(t.seed)
    precision = resolve_precision(t.precision, device)
    log.info(
        "device %s <trainer.device=%s>, precision %s <trainer.precision=%s>", device, t.device, precision, t.precision
    )
    if device.type == "cpu" and keep_freed_memory():
        log.debug("glibc malloc keeps freed memory (no page faults for per-step tensors over 32 MiB)")

    # 2. data, backbone, labels ------------------------------------------------------------------------------------
    train_split, val_split, test_split, index = load_data(cfg)
    prior = M.answer_prior(train_split.answers, train_split.types)  # before any head-specific drop
    backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir, train_split.questions + train_split.answers)
    tracker.log_params(flatten({"loaded": backbone.loaded}))  # what was loaded, not what was asked for
    labels, train_split, y_train, n_dropped = build_labels(cfg, backbone, train_split)
    splits = [train_split, val_split, test_split]
    warn_long_questions(splits, backbone.tokenizer, cfg.backbone.image_position_offset)

    # 3. model, loaders (from the feature cache when no phase trains the vision tower) ------------------------------
    model = build_model(cfg, backbone, len(labels)).to(device)
    compile_model(model, t.compile, device)  # trainer.compile (auto: CUDA graphs on CUDA, eager on CPU)
    state = TrainState()
    if t.init_from:
        state.trained_parts |= load_init(model, t.init_from)
    phases = resolve_phases(cfg)
    loaders = build_loaders(cfg, backbone, splits, y_train, labels, index, device, phases)

    # 4. train, phase by phase -------------------------------------------------------------------------------------
    trainer = Trainer(model, loaders, phases, cfg, device, precision, tracker, out, resolved, on_validation, stop)
    test, test_preds, counts = trainer.fit(state, resumed)

    # 5. results and files -----------------------------------------------------------------------------------------
    results = collect_results(test, test_preds, counts, state, prior, splits, n_dropped, phases)
    results.update(split_wups(cfg.paths.wordnet, test_split, test_preds, labels.classes))  # WUPS@0.9, @0.0
    log.info(
        "test/acc %.4f (prior %.4f), val/acc %.4f at step %d",
        results[M.TEST_ACC],
        results[M.TEST_PRIOR_ACC],
        results[M.VAL_ACC],
        state.best.step,
    )
    files = write_run_files(out, resolved, state.history, results, test_split, test_preds, labels.classes)
    record_loaded(out / "metrics.json", backbone.loaded)
    if t.save_checkpoint:
        save_best(
            out / "best.pt",
            config=resolved,
            state_dict=state.best.state,
            frozen=sorted(set(PARTS) - state.trained_parts),
            label_kind=labels.kind,
            classes=labels.classes,
            vision_source=backbone.vision_source,
            text_source=backbone.text_source,
            best_step=state.best.step,
            metrics=json_safe(results),
        )

    # 6. tracking: final metrics (same names as metrics.json), artifacts, the model -------------------------------
    log_results(tracker, cfg, info, out, results, state.step, files, backbone, (test_split, index))
    return results


def log_results(tracker: Tracker, cfg, info: RunInfo, out: Path, results, step, files, backbone, example_from) -> None:
    """The final metrics, the run's files, best.pt and the MLflow model (single runs by default, not sweep jobs)."""
    tracker.log_metrics(results, step)
    for f in files:
        tracker.log_artifact(f)
    if (out / ".hydra" / "overrides.yaml").is_file():
        tracker.log_artifact(out / ".hydra" / "overrides.yaml", "hydra")
    has_best = (out / "best.pt").is_file()
    log_ckpt, log_model = cfg.tracking.log_checkpoint, cfg.tracking.log_model
    if (not info.multirun if log_ckpt is None else log_ckpt) and has_best:
        tracker.log_artifact(out / "best.pt", "checkpoint")
    if (not info.multirun if log_model is None else log_model) and has_best:
        test_split, index = example_from  # the input example: the first test question and its picture
        example = {"image": index[test_split.image_ids[0]].read_bytes(), "question": test_split.questions[0]}
        dirs = {"vision": backbone.vision_source, "text": backbone.text_source}
        local = {k: d for k, d in dirs.items() if Path(d).is_dir()}  # hub names load from the hub (or HF cache)
        tracker.log_model(out / "best.pt", example, cfg.tracking.register_as, local if len(local) == 2 else {})


def collect_results(test, test_preds, counts, state: TrainState, prior, splits, n_dropped, phases) -> dict:
    """metrics.json: the last phase's test metrics beside the answer prior, earlier phases, counts and timing."""
    train_split, val_split, test_split = splits
    prior_correct = [prior.get(q, None) == a for q, a in zip(test_split.types, test_split.answers, strict=True)]
    return {
        **test,
        M.VAL_ACC: state.best.acc,
        **M.accuracy_by_type(prior_correct, test_split.types, M.TEST_PRIOR_ACC),
        **state.phase_metrics,
        "best_step": state.best.step,
        "steps": state.step,
        "epochs": sum(p.epochs for p in phases),
        "train/seconds": state.seconds,  # in training steps, this process (validation and test excluded)
        "train/examples_per_s": state.seen_here / state.seconds if state.seconds else float("nan"),
        "train/compile_fallback": int(state.compile_fallback is not None),  # 1: torch.compile failed, eager ran
        "data/n_train": len(train_split),
        "data/n_val": len(val_split),
        "data/n_test": len(test_split),
        M.N_TEST_EVALUATED: len(test_preds),  # fewer only if data.on_bad_image=skip dropped unreadable images
        "data/n_train_dropped": n_dropped,
        **counts,
    }


def end_tracked_run(tracker: Tracker, error: BaseException, out: Path) -> None:
    """End the tracked run as ``error`` ended training: KILLED for SIGTERM (tagged resumable), Ctrl-C or a pruned
    Optuna trial (tagged ``clipqa.pruned``); FAILED, with the message, for anything else."""
    if isinstance(error, Preempted):
        tracker.set_tags({"clipqa.resumable": "true"})
        tracker.finish("KILLED", error=str(error), run_dir=out)
    elif isinstance(error, KeyboardInterrupt):
        tracker.finish("KILLED", error="interrupted (KeyboardInterrupt)", run_dir=out)
    elif type(error).__name__ == "TrialPruned":  # optuna's, without importing optuna here
        tracker.set_tags({"clipqa.pruned": "true"})
        tracker.finish("KILLED", error=f"pruned by Optuna: {error}", run_dir=out)
    else:
        tracker.finish("FAILED", error=f"{type(error).__name__}: {error}", run_dir=out)


def previous_run_id(out: Path, cfg: DictConfig, resumed: dict | None) -> str | None:
    """The MLflow run this run folder already has (a restart continues it: no duplicate runs), checkpoint or not."""
    previous = resumed["mlflow_run_id"] if resumed else None
    if previous is None and cfg.trainer.resume == "auto" and (out / RUN_ID_FILE).is_file():
        previous = (out / RUN_ID_FILE).read_text().strip() or None
    return previous


def finished_metrics(out: Path, resolved: dict) -> dict | None:
    """The metrics of a finished run of the same config in ``out`` (re-running a sweep skips finished jobs)."""
    if not ((out / DONE_MARKER).is_file() and (out / "metrics.json").is_file() and (out / "config.yaml").is_file()):
        return None
    import yaml

    if not same_run(yaml.safe_load((out / "config.yaml").read_text()), resolved):
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("loaded", None)  # train() returns the metrics, as a fresh run does
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def record_loaded(metrics_file: Path, loaded: dict) -> None:
    """metrics.json's ``loaded``: per tower, the source, model type, parameter count and weights digest (kept out of
    the metrics proper, which are numbers logged to MLflow; these are MLflow params ``loaded.*``)."""
    data = json.loads(metrics_file.read_text())
    metrics_file.write_text(json.dumps({**data, "loaded": loaded}, indent=2) + "\n")


def check_writable(folder: Path, what: str) -> None:
    """Fail up front, naming the folder, if it cannot be created or written (permissions, a file in the way,
    a full disk)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".clipqa-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ClipqaError(
            f"Cannot write to {folder}, {what}: {e.strerror or e}. Point it at a writable folder."
        ) from None


def write_run_files(out: Path, resolved: dict, history, results, test: Split, preds, classes) -> list[Path]:
    """config.yaml, history.jsonl, metrics.json, test_predictions.tsv and the curves; returns the files to log."""
    (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    with open(out / "history.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    (out / "metrics.json").write_text(json.dumps(json_safe(results), indent=2) + "\n")
    write_predictions(out / "test_predictions.tsv", test, preds, classes)
    curves = save_curves(history, out)
    return [out / "config.yaml", out / "metrics.json", out / "test_predictions.tsv", *curves]
