"""Fetch COCO-QA and the COCO 2014 images: resumable, verified downloads and safe, atomic extraction.

    clipqa-download --to data/                  # -> data/cocoqa (train/, test/) and data/coco (train2014/, val2014/)

Downloads go to ``<to>/.downloads/<archive>.part`` and are resumed with HTTP range requests after an interruption,
as long as the server still has the same file (same ``ETag``/``Last-Modified``/size; otherwise, or when the server
ignores ranges, the download starts over). Transient errors are retried with exponential backoff. Each archive is
checked (its size against ``Content-Length``, every member's CRC with ``zipfile``, and its sha256 against the
manifest ``<to>/.downloads/manifest.json`` written at its first complete download), then extracted into a temporary
folder that is renamed into place only when complete. Members with absolute paths, ``..`` components or symbolic
links are refused, naming the member.

Why hand-written: the usual fetchers do part of this (``requests`` streams, ``pooch`` checks hashes, ``zipfile``
extracts) but none resumes a multi-GB download with range requests while checking that the file did not change
between attempts, and ``zipfile`` silently rewrites unsafe member names instead of refusing them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

COCOQA_URL = "http://www.cs.toronto.edu/~mren/research/imageqa/data/cocoqa/cocoqa-2015-05-17.zip"
COCO_URL = "http://images.cocodataset.org/zips/"  # + train2014.zip, val2014.zip
MIRROR_ENV = "CLIPQA_DOWNLOAD_MIRROR"  # a base URL serving all three archives under their own names
ARCHIVES = ("cocoqa", "train2014", "val2014")
CHUNK = 1 << 16  # a cut connection loses at most one partly read chunk


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


# ---- downloading ------------------------------------------------------------------------------------------------
@dataclass
class Fetched:
    path: Path
    bytes_fetched: int  # over the network in this call (less than the size when a download was resumed)
    resumed: bool


def fetch(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Fetched:
    """Download ``url`` to ``dest`` (via ``dest.part``), resuming a partial download of the same file."""
    import requests

    part, meta_file = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    fetched, resumed, attempt = 0, False, 0
    while True:
        attempt += 1
        try:
            n, r = _fetch_once(requests, url, part, meta_file, timeout_s, progress)
            fetched, resumed = fetched + n, resumed or r
            break
        except _Transient as e:
            fetched += e.fetched
            if attempt > retries:
                raise ClipqaError(
                    f"Downloading {url} failed {attempt} times ({e}). Check the network or the URL (a mirror: "
                    f"--cocoqa-url/--coco-url or ${MIRROR_ENV}); re-running the same command resumes the download."
                ) from None
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("download of %s interrupted (%s); retrying in %.0f s (%d/%d)", url, e, wait, attempt, retries)
            time.sleep(wait)
    os.replace(part, dest)
    meta_file.unlink(missing_ok=True)
    return Fetched(dest, fetched, resumed)


class _Transient(Exception):
    def __init__(self, message: str, fetched: int = 0):
        super().__init__(message)
        self.fetched = fetched


def _fetch_once(requests, url: str, part: Path, meta_file: Path, timeout_s: float, progress: bool) -> tuple[int, bool]:
    """One attempt; returns (bytes fetched, whether it resumed). Raises _Transient for errors worth retrying."""
    have = part.stat().st_size if part.is_file() else 0
    meta = json.loads(meta_file.read_text()) if have and meta_file.is_file() else {}
    headers = {"Range": f"bytes={have}-"} if have and meta else {}
    if headers and meta.get("etag"):
        headers["If-Range"] = meta["etag"]  # the server sends the whole file instead if it changed
    elif headers and meta.get("last_modified"):
        headers["If-Range"] = meta["last_modified"]
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout_s)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None
    with response:
        if response.status_code == 404:
            raise ClipqaError(f"{url} does not exist on the server (HTTP 404). Check the URL or the mirror.")
        if response.status_code >= 500 or response.status_code == 429:
            raise _Transient(f"HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            raise ClipqaError(f"{url}: the server answered HTTP {response.status_code} {response.reason}.")
        resumed = response.status_code == 206 and _same_file(meta, response, have)
        if not resumed:  # a fresh start: no partial file, the server ignored the range, or the file changed
            if have:
                log.info("restarting %s from the beginning (the server %s)", url, _why_restart(response, meta))
            have = 0
        total = have + int(response.headers.get("Content-Length", 0) or 0) or None
        meta_file.write_text(
            json.dumps(
                {
                    "url": url,
                    "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified"),
                    "size": total,
                }
            )
        )
        fetched = 0
        bar = _progress(part.name.removesuffix(".part"), total, have, progress)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    fetched += len(chunk)
                    bar.update(len(chunk))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as e:
            raise _Transient(f"connection lost after {have + fetched} bytes ({type(e).__name__})", fetched) from None
        except OSError as e:
            raise _disk_error(e, part) from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Transient(f"got {size} of {total} bytes", fetched)
    return fetched, resumed


def _same_file(meta: dict, response, have: int) -> bool:
    """A 206 answer continues our partial file only if it starts where ours ends and the file is the one we had."""
    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
    if start != str(have):
        return False
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if meta.get(key) and response.headers.get(header) and meta[key] != response.headers[header]:
            return False
    return True


def _why_restart(response, meta: dict) -> str:
    if response.status_code == 200:
        return "does not resume downloads (no range support) or the file changed"
    return "has another version of the file"


def _progress(desc: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
    )


def _disk_error(e: OSError, path: Path) -> ClipqaError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free / 2**30
        return ClipqaError(
            f"The disk is full while writing {path} ({free:.1f} GiB free). COCO 2014 needs about 20 GB for the "
            "archives plus 20 GB extracted (--only-referenced extracts less); free space or choose another --to."
        )
    return ClipqaError(f"Cannot write {path}: {e.strerror or e}.")


# ---- verifying --------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, manifest: dict, name: str) -> str | None:
    """None if ``path`` is a sound zip archive matching the manifest (recording it on first sight), else why not."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable zip archive ({e})"
    if bad is not None:
        return f"member {bad} is corrupt (CRC mismatch)"
    digest = sha256(path)
    known = manifest.get(name)
    if known and known.get("sha256") != digest:
        return f"sha256 {digest[:12]}... differs from the manifest's {known['sha256'][:12]}..."
    manifest[name] = {"sha256": digest, "size": path.stat().st_size, "file": path.name}
    return None


# ---- extracting -------------------------------------------------------------------------------------------------
def check_members(z: zipfile.ZipFile, archive: Path) -> None:
    """Refuse members that could write outside the target folder: absolute paths, ``..``, symbolic links."""
    for info in z.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        is_link = stat.S_ISLNK(info.external_attr >> 16)
        if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts or is_link:
            why = "a symbolic link" if is_link else "a path that leaves the target folder"
            raise ClipqaError(
                f"Refusing to extract {archive}: its member {name!r} is {why}. Nothing was extracted; the archive "
                "is not a genuine COCO-QA/COCO archive (delete it, check the URL or mirror)."
            )


def extract(archive: Path, into: Path, keep: Callable[[str], bool] | None = None) -> tuple[int, int, int]:
    """Extract ``archive`` into the folder ``into`` (created; must not exist), atomically: into a temporary folder
    first, renamed when complete. ``keep(member name)`` selects members. Returns (members kept, skipped, bytes
    skipped)."""
    tmp = into.with_name(f".{into.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kept = skipped = skipped_bytes = 0
    try:
        with zipfile.ZipFile(archive) as z:
            check_members(z, archive)
            members = [m for m in z.infolist() if not m.is_dir()]
            bar = _progress(f"extracting {archive.name}", len(members), 0, True)
            for m in members:
                if keep is not None and not keep(m.filename):
                    skipped, skipped_bytes = skipped + 1, skipped_bytes + m.file_size
                else:
                    z.extract(m, tmp)
                    kept += 1
                bar.update(1)
            bar.close()
        os.rename(tmp, into)  # the folder appears complete or not at all
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(e, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kept, skipped, skipped_bytes


def cocoqa_root(folder: Path) -> Path:
    """The folder holding ``train/`` and ``test/`` in an extracted COCO-QA archive (the top or one level down)."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "train" / "questions.txt").is_file() and (candidate / "test" / "questions.txt").is_file():
            return candidate
    raise ClipqaError(f"{folder}: the COCO-QA archive holds no train/ and test/ folders; is it the right archive?")


def referenced_images(cocoqa: Path) -> set[int]:
    """Image ids that COCO-QA's questions use."""
    return {int(x) for split in ("train", "test") for x in (cocoqa / split / "img_ids.txt").read_text().split()}


# ---- the whole job ----------------------------------------------------------------------------------------------
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
            keep = lambda name, wanted=wanted: _image_id(name) in wanted  # noqa: E731
        zip_path = downloads / archive.filename
        fetched = _fetch_verified(archive, zip_path, manifest, manifest_file, retries, backoff_s, timeout_s, progress)
        staging = to / f".{archive.name}.staging-{os.getpid()}"
        kept, skipped, skipped_bytes = extract(zip_path, staging, keep)
        try:
            content = cocoqa_root(staging) if archive.name == "cocoqa" else _single_folder(staging, archive.name)
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


def _single_folder(staging: Path, name: str) -> Path:
    """COCO's train2014.zip holds one folder ``train2014/``; accept the images at the top as well."""
    return staging / name if (staging / name).is_dir() else staging


def _image_id(member: str) -> int | None:
    stem = PurePosixPath(member).stem  # COCO_train2014_000000000009
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None
