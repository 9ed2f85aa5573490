"""clipqa-download against a local HTTP server: resumed, verified, safely extracted, then trained on."""

import hashlib
import json
import logging
import stat
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clipqa import cli
from clipqa.data.archive import extract
from clipqa.data.demo import generate
from clipqa.data.download import download_datasets
from clipqa.errors import ClipqaError

COCOQA = "cocoqa-2015-05-17.zip"
N_EXTRA = 5  # unreferenced images in train2014.zip (what --only-referenced leaves out)


def zip_folder(src: Path, dest: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            z.write(f, prefix + f.relative_to(src).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return dest.read_bytes()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    """The three archives in their real layouts, made from the demo data writer (40 + 10 questions)."""
    root = tmp_path_factory.mktemp("archives")
    data = generate(root / "demo", 40, 10, 0, 32)
    jpeg = next((data / "images" / "train2014").iterdir()).read_bytes()
    extra = {f"train2014/COCO_train2014_{900_000 + i:012d}.jpg": jpeg for i in range(N_EXTRA)}
    return {
        COCOQA: _cocoqa_zip(data, root),
        "train2014.zip": zip_folder(data / "images" / "train2014", root / "t.zip", "train2014/", extra),
        "val2014.zip": zip_folder(data / "images" / "val2014", root / "v.zip", "val2014/"),
    }


def _cocoqa_zip(data: Path, root: Path) -> bytes:
    with zipfile.ZipFile(root / COCOQA, "w") as z:
        for split in ("train", "test"):
            for f in sorted((data / split).iterdir()):
                z.write(f, f"{split}/{f.name}")
    return (root / COCOQA).read_bytes()


class Server:
    """A loopback HTTP server for the archives, with ranges (or not), cut connections, corruption and delays."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges = dict(files), ranges
        self.cut_first: dict[str, int] = {}  # path -> bytes of the body sent before the first response is cut
        self.corrupt_first: set[str] = set()  # paths whose first response is damaged (same length)
        self.delay_s = 0.0
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, body bytes sent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.handle(self)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out or left: expected here
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        time.sleep(self.delay_s)
        name = h.path.lstrip("/")
        if name not in self.files:
            h.send_error(404)
            return
        data = self.files[name]
        first = not any(p == name for p, _, _ in self.requests)
        if first and name in self.corrupt_first:
            middle = len(data) // 2
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
        etag = '"' + hashlib.sha1(data).hexdigest() + '"'
        start, asked = 0, h.headers.get("Range")
        if self.ranges and asked and h.headers.get("If-Range") in (None, etag):
            start = int(asked.removeprefix("bytes=").split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("ETag", etag)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        body = data[start:]
        if first and name in self.cut_first:
            body = body[: self.cut_first[name]]
            h.close_connection = True
        h.wfile.write(body)
        h.wfile.flush()
        self.requests.append((name, asked, len(body)))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(archives):
    s = Server(archives)
    yield s
    s.close()


def get(to: Path, server: Server, what=("cocoqa", "train2014", "val2014"), **kw) -> list[str]:
    kw = {"retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "progress": False, **kw}
    return download_datasets(to, list(what), cocoqa_url=server.url + COCOQA, coco_url=server.url, **kw)


def test_downloads_extracts_and_prints_the_overrides(server, tmp_path, capsys):
    code = 0
    try:
        cli.download(["--to", str(tmp_path / "data"), "--cocoqa-url", server.url + COCOQA, "--coco-url", server.url])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    data = tmp_path / "data"
    assert code == 0
    assert f"python train.py data.root={data / 'cocoqa'} data.image_root={data / 'coco'}" in out
    assert (data / "cocoqa" / "train" / "questions.txt").is_file()
    assert len(list((data / "coco" / "train2014").iterdir())) == 20 + N_EXTRA
    assert not list((data / ".downloads").glob("*.zip"))  # archives removed after extraction (--keep-zips keeps)
    manifest = json.loads((data / ".downloads" / "manifest.json").read_text())
    assert set(manifest) == {"cocoqa", "train2014", "val2014"}
    assert all("already in" in line for line in get(data, server))  # a complete dataset is never overwritten


@pytest.mark.slow
def test_a_downloaded_dataset_trains(server, tmp_path, cache_dir):
    from clipqa.training.run import train
    from tests.helpers.runs import compose_cfg

    data = tmp_path / "data"
    get(data, server)
    cfg = compose_cfg(
        [f"data.root={data / 'cocoqa'}", f"data.image_root={data / 'coco'}", "backbone=tiny", "head=answers",
         "backbone.tiny.image_size=32", "mapper.hidden_dim=32", "trainer.max_steps=2", "tracking=none",
         "trainer.num_workers=0"],
        cache_dir,
    )  # fmt: skip
    metrics = train(cfg, tmp_path / "run")
    assert metrics["steps"] == 2 and metrics["data/n_test"] == 10


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path, archives, monkeypatch):
    monkeypatch.setattr("clipqa.data.fetch.CHUNK", 1024)  # the last, partly read chunk of a cut connection is lost
    size = len(archives["train2014.zip"])
    server.cut_first["train2014.zip"] = size // 3
    with pytest.raises(ClipqaError, match="resumes the download"):
        get(tmp_path, server, ["train2014"], retries=0)
    have = (tmp_path / ".downloads" / "train2014.zip.part").stat().st_size
    assert size // 3 - 1024 < have <= size // 3
    lines = get(tmp_path, server, ["train2014"])
    (name, asked, sent), = [r for r in server.requests[1:] if r[0] == "train2014.zip"]  # fmt: skip
    assert asked == f"bytes={have}-" and sent == size - have  # only the rest was fetched again
    assert "resumed" in lines[0] and (tmp_path / "coco" / "train2014").is_dir()


def test_a_server_without_range_support_restarts_cleanly(archives, tmp_path):
    server = Server(archives, ranges=False)
    try:
        size = len(archives["val2014.zip"])
        server.cut_first["val2014.zip"] = size // 2
        lines = get(tmp_path, server, ["val2014"])  # the retry inside the same call
    finally:
        server.close()
    assert [sent for _, _, sent in server.requests] == [size // 2, size]  # the whole file again
    assert "resumed" not in lines[0] and len(list((tmp_path / "coco" / "val2014").iterdir())) == 5


def test_a_corrupted_archive_is_detected_and_fetched_again(server, tmp_path, caplog):
    server.corrupt_first.add("val2014.zip")
    with caplog.at_level(logging.WARNING):
        lines = get(tmp_path, server, ["val2014"])
    assert [p for p, _, _ in server.requests] == ["val2014.zip", "val2014.zip"]
    assert "corrupt" in caplog.text or "not a readable zip" in caplog.text
    assert "failed verification" in lines[0] and len(list((tmp_path / "coco" / "val2014").iterdir())) == 5


def test_only_referenced_images_are_extracted_and_the_saving_reported(server, tmp_path):
    lines = get(tmp_path, server, only_referenced=True)
    assert len(list((tmp_path / "coco" / "train2014").iterdir())) == 20
    assert f"{N_EXTRA} unreferenced images not extracted" in lines[1]


@pytest.mark.parametrize(
    "member, link",
    [("../evil.txt", False), ("/tmp/clipqa-evil.txt", False), ("train2014/a/../../../evil.txt", False),
     ("train2014/link.jpg", True)],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink"],
)  # fmt: skip
def test_archive_members_that_escape_the_target_are_refused(tmp_path, member, link):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train2014/ok.jpg", b"fine")
        info = zipfile.ZipInfo(member)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd" if link else "evil")
    target = tmp_path / "deep" / "out"
    target.parent.mkdir()
    with pytest.raises(ClipqaError, match=f"member '{member}'"):
        extract(archive, target)
    assert not target.exists() and not list(target.parent.iterdir())  # nothing written, no half-extracted folder
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/clipqa-evil.txt").exists()


def test_missing_files_and_a_silent_server_are_clear_errors(server, tmp_path):
    with pytest.raises(ClipqaError, match="HTTP 404"):
        download_datasets(tmp_path, ["cocoqa"], cocoqa_url=server.url + "nope.zip", progress=False)
    server.delay_s = 1.0
    with pytest.raises(ClipqaError, match="failed 2 times"):
        get(tmp_path, server, ["val2014"], timeout_s=0.2)


def test_a_full_disk_is_a_clear_error_and_leaves_no_folder_that_looks_complete(server, tmp_path, monkeypatch):
    import errno

    real_extract, calls = zipfile.ZipFile.extract, []

    def disk_fills_up(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", disk_fills_up)
    with pytest.raises(ClipqaError, match="disk is full"):
        get(tmp_path, server, ["train2014"])
    assert not (tmp_path / "coco").exists()  # no train2014/ that a run would take for a dataset
    assert not [p for p in tmp_path.iterdir() if p.name != ".downloads"]  # and no staging folder left behind
