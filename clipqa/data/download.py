"""Fetch COCO-QA and the COCO 2014 images: resumable, verified downloads and safe, atomic extraction.

    clipqa-download --to data/                  # -> data/cocoqa (train/, test/) and data/coco (train2014/, val2014/)

Downloads go to ``<to>/.downloads/<archive>.part`` and are resumed with HTTP range requests after an interruption,
as long as the server still has the same file (same ``ETag``/``Last-Modified``/size; otherwise, or when the server
ignores ranges, the download starts over). Transient errors are retried with exponential backoff. Each archive is
checked (its size against ``Content-Length``, every member's CRC with ``zipfile``, and its sha256 against the
manifest ``<to>/.downloads/manifest.json`` written at its first complete download), then extracted into a temporary
folder that is renamed into place only when complete. Members with absolute paths, ``..`` components or symbolic
links are refused, naming the member. The pieces: :mod:`clipqa.data.fetch` (HTTP, resume, retries) and
:mod:`clipqa.data.archive` (verify, extract).

Why hand-written: the usual fetchers do part of this (``requests`` streams, ``pooch`` checks hashes, ``zipfile``
extracts) but none resumes a multi-GB download with range requests while checking that the file did not change
between attempts, and ``zipfile`` silently rewrites unsafe member names instead of refusing them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipqa.data.archive import cocoqa_root, extract, image_id, referenced_images, single_folder, verify
from clipqa.data.fetch import fetch
from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

COCOQA_URL = "http://www.cs.toronto.edu/~mren/research/imageqa/data/cocoqa/cocoqa-2015-05-17.zip"
COCO_URL = "http://images.cocodataset.org/zips/"  # + train2014.zip, val2014.zip
MIRROR_ENV = "CLIPQA_DOWNLOAD_MIRROR"  # a base URL serving all three archives under their own names
ARCHIVES = ("cocoqa", "train2014", "val2014")


@dataclass
class Archive:
    name: str  # cocoqa | train2014 | val2014
    url: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.url.split("?")[0]).name


def archives(what: list[str], cocoqa_url: str | None = None, coco_url: str | None = None) -> list[Archive]:
    """The archives to fetch, from the flags, else ``$CLIPQA_DOWNLOAD_MIRROR``, else the official locations."""
    unknown = [w for w in what if w not in ARCHIVES]
    if unknown:
        raise ClipqaError(f"--what {','.join(unknown)}: unknown archive; choose from {','.join(ARCHIVES)}.")
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    cocoqa = cocoqa_url or (f"{mirror}/{PurePosixPath(COCOQA_URL).name}" if mirror else COCOQA_URL)
    coco = (coco_url or (mirror or COCO_URL)).rstrip("/") + "/"
    urls = {"cocoqa": cocoqa, "train2014": f"{coco}train2014.zip", "val2014": f"{coco}val2014.zip"}
    return [Archive(name, urls[name]) for name in ARCHIVES if name in what]


def targets(to: Path) -> dict[str, Path]:
    """Where each archive's content goes: ``data.root`` is ``<to>/cocoqa``, ``data.image_root`` is ``<to>/coco``."""
    return {"cocoqa": to / "cocoqa", "train2014": to / "coco" / "train2014", "val2014": to / "coco" / "val2014"}


def download_datasets(
    to: str | Path,
    what: list[str],
    *,
    cocoqa_url: str | None = None,
    coco_url: str | None = None,
    keep_zips: bool = False,
    only_referenced: bool = False,
    force: bool = False,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> list[str]:
    """Fetch, verify and extract the archives ``what`` into ``to``; returns one summary line per archive."""
    to = Path(to).expanduser().resolve()
    downloads = to / ".downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipqaError(
            f"Cannot create {downloads} (--to {to}): {e.strerror or e}. Choose a writable folder."
        ) from None
    manifest_file = downloads / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    where, summary = targets(to), []
    for archive in archives(what, cocoqa_url, coco_url):
        target = where[archive.name]
        if target.is_dir() and not force:
            summary.append(f"{archive.name}: already in {target} (--force fetches it again)")
            continue
        keep = None
        if only_referenced and archive.name != "cocoqa":
            if not (where["cocoqa"] / "train" / "img_ids.txt").is_file():
                raise ClipqaError(
                    f"--only-referenced needs COCO-QA's questions in {where['cocoqa']}: add cocoqa to --what."
                )
            wanted = referenced_images(where["cocoqa"])
            keep = lambda name, wanted=wanted: image_id(name) in wanted  # noqa: E731
        zip_path = downloads / archive.filename
        fetched = _fetch_verified(archive, zip_path, manifest, manifest_file, retries, backoff_s, timeout_s, progress)
        staging = to / f".{archive.name}.staging-{os.getpid()}"
        kept, skipped, skipped_bytes = extract(zip_path, staging, keep)
        try:
            content = cocoqa_root(staging) if archive.name == "cocoqa" else single_folder(staging, archive.name)
            if target.exists():  # --force: replaced only now that the new copy is complete
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(content, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not keep_zips:
            zip_path.unlink()
        line = f"{archive.name}: {kept} files in {target} ({fetched})"
        if keep is not None:
            line += (
                f"; --only-referenced: {skipped} unreferenced images not extracted ({skipped_bytes / 2**30:.2f} GiB)"
            )
        summary.append(line)
    return summary


def _fetch_verified(archive, zip_path, manifest, manifest_file, retries, backoff_s, timeout_s, progress) -> str:
    """The archive at ``zip_path``, downloaded (or found) and verified; fetched once more if it fails the check."""
    notes = []
    for attempt in (1, 2):
        if zip_path.is_file():
            notes.append("found, not downloaded")
        else:
            got = fetch(
                archive.url, zip_path, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, progress=progress
            )
            notes.append(f"downloaded {got.bytes_fetched / 2**20:.1f} MiB" + (", resumed" if got.resumed else ""))
        problem = verify(zip_path, manifest, archive.name)
        if problem is None:
            manifest_file.write_text(json.dumps(manifest, indent=1))
            return "; ".join(notes) + "; verified"
        zip_path.unlink()
        if attempt == 2:
            raise ClipqaError(
                f"{archive.url} fails verification twice ({problem}). The server or mirror serves a damaged or "
                f"different file; try another mirror. If the file legitimately changed, delete {manifest_file}."
            )
        log.warning("%s: %s; fetching it again", zip_path.name, problem)
        notes.append(f"failed verification ({problem})")
    raise AssertionError("unreachable")
