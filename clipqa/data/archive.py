"""Checking and extracting a downloaded zip archive: every member's CRC and the archive's sha256 against the
manifest, then an atomic extraction (into a temporary folder renamed when complete) that refuses members with
absolute paths, ``..`` components or symbolic links, naming the member (``zipfile`` would silently rewrite them)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from clipqa.data.fetch import CHUNK, disk_error, progress_bar
from clipqa.errors import ClipqaError


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
            bar = progress_bar(f"extracting {archive.name}", len(members), 0, True)
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
        raise disk_error(e, tmp) from None
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


def single_folder(staging: Path, name: str) -> Path:
    """COCO's train2014.zip holds one folder ``train2014/``; accept the images at the top as well."""
    return staging / name if (staging / name).is_dir() else staging


def image_id(member: str) -> int | None:
    stem = PurePosixPath(member).stem  # COCO_train2014_000000000009
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None
