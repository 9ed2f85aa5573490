"""Resumable HTTP downloads: a file is fetched to ``<dest>.part`` and resumed with range requests after an
interruption, as long as the server still has the same file (same ``ETag``/``Last-Modified``/size; otherwise, or
when the server ignores ranges, the download starts over). Transient errors are retried with exponential backoff.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # a cut connection loses at most one partly read chunk


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
                    "--cocoqa-url/--coco-url or $CLIPQA_DOWNLOAD_MIRROR); re-running the same command resumes the "
                    "download."
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
        bar = progress_bar(part.name.removesuffix(".part"), total, have, progress)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    fetched += len(chunk)
                    bar.update(len(chunk))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as e:
            raise _Transient(f"connection lost after {have + fetched} bytes ({type(e).__name__})", fetched) from None
        except OSError as e:
            raise disk_error(e, part) from None
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


def progress_bar(desc: str, total: int | None, initial: int, enabled: bool):
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


def disk_error(e: OSError, path: Path) -> ClipqaError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free / 2**30
        return ClipqaError(
            f"The disk is full while writing {path} ({free:.1f} GiB free). COCO 2014 needs about 20 GB for the "
            "archives plus 20 GB extracted (--only-referenced extracts less); free space or choose another --to."
        )
    return ClipqaError(f"Cannot write {path}: {e.strerror or e}.")
