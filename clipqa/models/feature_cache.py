"""The frozen-feature cache: every image is encoded by the frozen CLIP tower once, then read back by every run.

A sweep trains the same architecture many times over the same images. While the vision tower is frozen its
output for an image never changes, so decoding the JPEG and running CLIP at every step of every run (what the
paper's script did) is wasted work. :func:`ensure_store` encodes each image once into a store that every later run
and every sweep job reuses; ``clipqa.training.run`` uses it automatically when no phase trains the vision tower
(``features.cache=true``) and bypasses it when one does.

Store layout (one folder per key under ``features.dir``, default ``<paths.cache_dir>/features``)::

    <key>/features.npy   (n_images, N, D) float16 (``features.dtype``), an ordinary .npy: np.load(mmap_mode="r")
    <key>/index.json     image ids in row order, unreadable images (on_bad_image=skip), the key's description
    <key>.lock           held while one process builds; the others wait, then reuse

The key is a hash of everything the features depend on: the vision weights (a digest of every tensor), the
vision config, the image processor's class and settings, the token selection (``image_tokens``), the stored
dtype, the library releases that decode and compute (Pillow, torch without its build tag, transformers), and every
image's file name, size and modification time. A changed input gives a new key, so a stale entry cannot be read.
torch's build tag (``+cu124``, ``+cpu``) is left out so that CPU and GPU nodes share one store: the build runs CLIP
in fp32 with TF32 off (cuDNN allows it by default for the patch convolution), so a GPU's features differ from a
CPU's by float order only, far below the fp16 rounding of the stored features.

Safety: a store is written into ``<key>.tmp-<pid>/`` and renamed to ``<key>/`` only when complete (after fsync),
so an interrupted build never looks complete. Several processes starting at once (sweep jobs, Optuna workers)
serialise on ``<key>.lock`` (a ``filelock`` file lock, released by the OS if its holder dies): one builds, the
others wait and then reuse it. Leftover ``.tmp-*`` folders of dead builds are removed by the next builder.

Training reads rows with positional reads (``os.pread``) rather than through a live ``np.memmap``: the store's
pages then stay in the OS page cache, shared by every process, and never count towards a training process's own
memory, however large the store is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipqa.data.cocoqa import load_pixels, worker_context
from clipqa.models.backbones import n_image_tokens, weights_digest  # weights_digest: part of the cache key
from clipqa.models.image_tokens import n_selected, select_tokens

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the store layout or the meaning of a feature changes
DTYPES = {"fp16": np.float16, "fp32": np.float32}


# ---- the key -------------------------------------------------------------------------------------------------


def image_fingerprints(paths: dict[int, Path]) -> list[list]:
    """``[image_id, file name, size in bytes, mtime in ns]`` per image, sorted by id.

    The folder is left out on purpose, so moving the image folder (or ``rsync -a`` to a node's local disk) keeps
    the key; editing or replacing a file changes its size or modification time and so the key.
    """
    out = []
    for image_id in sorted(paths):
        st = os.stat(paths[image_id])
        out.append([image_id, paths[image_id].name, st.st_size, st.st_mtime_ns])
    return out


def describe(vision: torch.nn.Module, processor, select: str, k: int | None, dtype: str) -> dict:
    """Everything except the images that the features depend on (JSON-able; hashed into the key)."""
    import PIL
    import transformers

    vcfg = vision.config.to_dict()
    for transient in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        vcfg.pop(transient, None)
    return {
        "format": FORMAT,
        "vision_class": type(vision).__name__,
        "vision_config": vcfg,
        "vision_weights_sha256": weights_digest(vision),
        "processor_class": type(processor).__name__,
        "processor": json.loads(processor.to_json_string()),
        "image_tokens": {"select": select, "k": k if select == "pooled" else None},
        "dtype": dtype,
        "versions": {
            "pillow": PIL.__version__,
            "torch": release(torch.__version__),
            "transformers": transformers.__version__,
        },
    }


def release(version: str) -> str:
    """``2.13.0+cu124`` -> ``2.13.0``: the build tag names the device support, not what the kernels compute."""
    return version.split("+")[0]


def store_key(description: dict, fingerprints: list[list]) -> str:
    h = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    h.update(json.dumps(fingerprints).encode())
    return h.hexdigest()[:20]


# ---- the store ------------------------------------------------------------------------------------------------


class FeatureStore:
    """Read side of a finished store: ``store[image_id] -> (N, D)`` tensor in the stored dtype.

    Safe to use from DataLoader workers (positional reads on a descriptor opened per process).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        self.rows = {int(i): r for r, i in enumerate(meta["image_ids"])}
        self.bad = {int(i): why for i, why in meta["bad"].items()}
        arr = np.load(self.folder / "features.npy", mmap_mode="r")  # header only; nothing is read yet
        self.shape, self.dtype, self.offset = arr.shape[1:], arr.dtype, arr.offset
        del arr
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.rows and image_id not in self.bad

    def __getitem__(self, image_id: int) -> torch.Tensor:
        if self._pid != os.getpid():  # a DataLoader worker: its own descriptor
            self._fd, self._pid = os.open(self.folder / "features.npy", os.O_RDONLY), os.getpid()
        buf = os.pread(self._fd, self.row_bytes, self.offset + self.rows[image_id] * self.row_bytes)
        return torch.from_numpy(np.frombuffer(buf, dtype=self.dtype).reshape(self.shape).copy())  # (N, D)

    def __getstate__(self):  # pickled into spawned workers: no descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())


@dataclass
class _Images(Dataset):
    """Decoded, pre-processed images for the build: item -> (row, pixel_values (3, H, W) or None if unreadable)."""

    ids: list[int]
    paths: dict[int, Path]
    processor: object
    on_bad_image: str
    users: dict[int, str]  # image id -> "question 3 of the train split" (for the error message)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int):
        image_id = self.ids[row]
        path, user = self.paths[image_id], self.users[image_id]
        # Skips are logged by the main process: a worker's log records would not reach the run's log file.
        pixels, error = load_pixels(path, self.processor, self.on_bad_image, user, log_skip=False)
        return row, pixels, error


def _collate(items):
    rows = [r for r, p, _ in items if p is not None]
    bad = {r: e for r, p, e in items if p is None}
    pixels = torch.stack([p for _, p, _ in items if p is not None]) if rows else None  # (B, 3, H, W)
    return rows, pixels, bad


def ensure_store(
    *,
    vision: torch.nn.Module,
    processor,
    paths: dict[int, Path],
    users: dict[int, str],
    select: str,
    k: int | None,
    dtype: str,
    folder: str | Path,
    device: torch.device,
    batch_size: int,
    num_workers: int | None,
    on_bad_image: str,
) -> FeatureStore:
    """The finished store for these images and this encoder, built now if no process has built it yet.

    ``paths``: image id -> file for every image a run needs; ``users``: image id -> which question uses it (for
    error messages). ``num_workers``: processes decoding images (None: one per CPU core this process may use).
    Blocks while another process builds the same key. Raises ClipqaError naming the file for an
    unreadable image under ``on_bad_image=error``; under ``skip`` the image is recorded as bad (its questions are
    dropped by the dataset and logged).
    """
    from filelock import FileLock, Timeout

    t0 = time.perf_counter()
    if num_workers is None:  # decoding JPEGs is the build's bottleneck once CLIP runs on a GPU: use every core
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    description = describe(vision, processor, select, k, dtype)
    key = store_key(description, image_fingerprints(paths))
    root = Path(folder).expanduser()
    final = root / key
    if (final / "index.json").is_file():
        log.info("feature cache hit: %s (%d images) <features.dir>", final, len(paths))
        return FeatureStore(final)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building the feature cache %s; waiting for it", final)
        lock.acquire()
    try:
        if (final / "index.json").is_file():  # built by the process we waited for
            log.info("feature cache built by another process: %s", final)
            return FeatureStore(final)
        for stale in root.glob(f"{key}.tmp-*"):  # we hold the lock: any tmp folder is a dead build's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        try:
            _build(
                tmp, vision, processor, paths, users, select, k, dtype, device, batch_size, num_workers, on_bad_image
            )
            meta = json.loads((tmp / "index.json").read_text())
            meta["description"] = description
            (tmp / "index.json").write_text(json.dumps(meta))
            _fsync_dir(tmp)
            os.rename(tmp, final)  # atomic: the store appears complete or not at all
        except BaseException:  # a bad image, Ctrl-C: nothing half-written stays (SIGKILL leaves it to the next build)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store = FeatureStore(final)
        log.info(
            "feature cache built: %s, %d images, %.1f MiB, %.0f s",
            final,
            len(paths),
            store.nbytes() / 2**20,
            time.perf_counter() - t0,
        )
        return store
    finally:
        lock.release()


@torch.no_grad()
def _build(tmp, vision, processor, paths, users, select, k, dtype, device, batch_size, num_workers, on_bad_image):
    from tqdm import tqdm

    ids = sorted(paths)
    tmp.mkdir(parents=True)
    was_training, vision_device = vision.training, next(vision.parameters()).device
    vision.eval().to(device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch convolution in full fp32 on a GPU too (see the key)
    n_tok = n_selected(n_image_tokens(vision), select, k)
    shape = (len(ids), n_tok, vision.config.hidden_size)
    np_dtype = DTYPES[dtype]
    header = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np_dtype, shape=shape)
    offset = header.offset
    del header  # rows are written with plain file writes, so the build's memory does not grow with the store
    loader = DataLoader(
        _Images(ids, paths, processor, on_bad_image, users),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # not the global RNG: a run draws the same dropout noise, cache built or not
        multiprocessing_context=worker_context(num_workers, device),  # never loky's (joblib), never fork on a GPU
    )
    bad: dict[str, str] = {}
    row_bytes = n_tok * shape[2] * np.dtype(np_dtype).itemsize
    bar = tqdm(total=len(ids), desc="encoding images (feature cache)", unit="img", file=sys.stderr)
    try:
        with open(tmp / "features.npy", "r+b") as f:
            for rows, pixels, errors in loader:
                for r, e in errors.items():
                    bad[str(ids[r])] = e
                    log.warning("skipped unreadable image %s (%s) <data.on_bad_image=skip>", paths[ids[r]], e)
                if rows:
                    # fp32 on purpose, never autocast: the features are a fixed function of the weights
                    hidden = vision(pixel_values=pixels.to(device, non_blocking=True)).last_hidden_state
                    feats = select_tokens(hidden, select, k).to("cpu", torch.float32).numpy().astype(np_dtype)
                    for r, row in zip(rows, feats, strict=True):  # rows are consecutive except around bad images
                        f.seek(offset + r * row_bytes)
                        f.write(row.tobytes())
                bar.update(len(rows) + len(errors))
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
        vision.to(vision_device).train(was_training)
        torch.backends.cudnn.allow_tf32 = tf32
    (tmp / "index.json").write_text(json.dumps({"image_ids": ids, "bad": bad}))


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureDataset(Dataset):
    """Like :class:`clipqa.data.cocoqa.QADataset`, with cached features instead of pixels.

    Items: ``{"image_features": (N, D) in the stored dtype, "question", "label", "type", "index"}``; ``None`` for a
    question whose image was unreadable under ``data.on_bad_image=skip`` (the collator drops it).
    """

    def __init__(self, split, labels: list[int], store: FeatureStore):
        self.split, self.labels, self.store = split, labels, store

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict | None:
        image_id = self.split.image_ids[i]
        if image_id not in self.store:
            return None
        return {
            "image_features": self.store[image_id],
            "question": self.split.questions[i],
            "label": self.labels[i],
            "type": self.split.types[i],
            "index": i,
        }
