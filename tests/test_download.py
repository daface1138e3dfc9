"""fetch / safe_extract_zip against a real HTTP server on 127.0.0.1 and zips built here."""

from __future__ import annotations

import hashlib
import io
import re
import stat
import struct
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from liverseg.data.download import fetch, safe_extract_zip
from liverseg.errors import DataError

# ----------------------------------------------------------------------------------- helpers
TRUNCATED_EXTRA = 1000  # bytes announced in Content-Length but never sent


class _RouteServer(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, tuple[str, bytes]]


class _Handler(BaseHTTPRequestHandler):
    server: _RouteServer

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        mode, body = route
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        if mode == "ok":
            self.send_header("Content-Length", str(len(body)))
        elif mode == "truncated":
            self.send_header("Content-Length", str(len(body) + TRUNCATED_EXTRA))
        # mode "no-length": HTTP/1.0 body delimited by closing the connection
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server:
    def __init__(self, httpd: _RouteServer) -> None:
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.base = f"http://{host!s}:{port}"

    def add(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.httpd.routes[path] = (mode, body)
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _RouteServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield Server(httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def zip_bytes(
    entries: Sequence[tuple[str | zipfile.ZipInfo, bytes]],
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are built on purpose
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def write_zip(
    path: Path, entries: Sequence[tuple[str | zipfile.ZipInfo, bytes]], **kw: int
) -> Path:
    path.write_bytes(zip_bytes(entries, **kw))
    return path


def entry_with_mode(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix, so external_attr's high half is a st_mode
    info.external_attr = mode << 16
    return info


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


GOOD = [
    ("case01/ct.nii.gz", b"CT" * 300),
    ("case01/mask.nii.gz", b"\x00\x01" * 200),
    ("README.txt", b"3D-IRCADb-01 test archive\n"),
]


# ------------------------------------------------------------------------------------ fetch
@pytest.mark.parametrize("progress", [False, True])
def test_http_download_matches_hashlib_and_extracts(
    server: Server, tmp_path: Path, progress: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    body = zip_bytes(GOOD)
    want = hashlib.sha256(body).hexdigest()
    url = server.add("/ircad.zip", body)
    dest = tmp_path / "dl" / "ircad.zip"

    got = fetch(url, dest, want, progress=progress, timeout=5)

    assert got == want
    assert dest.read_bytes() == body
    assert listing(dest.parent) == ["ircad.zip"]  # no temporary file left beside it
    err = capsys.readouterr().err
    assert ("ircad.zip" in err) is progress  # the tqdm bar is labelled with the file name

    target = tmp_path / "raw"
    files = safe_extract_zip(dest, target, max_bytes=10_000)
    assert files == [target / name for name, _ in GOOD]
    for name, data in GOOD:
        assert (target / name).read_bytes() == data
    assert listing(tmp_path) == ["dl", "raw"]


@pytest.mark.parametrize(
    ("mode", "case"),
    [("no-length", "lower"), ("ok", "upper"), ("ok", "empty")],
)
def test_http_download_without_length_or_pinned_digest(
    server: Server, tmp_path: Path, mode: str, case: str
) -> None:
    body = zip_bytes(GOOD)
    want = hashlib.sha256(body).hexdigest()
    pinned = {"lower": want, "upper": want.upper(), "empty": ""}[case]
    url = server.add("/a.zip", body, mode)
    assert fetch(url, tmp_path / "a.zip", pinned, progress=False, timeout=5) == want
    assert (tmp_path / "a.zip").read_bytes() == body


@pytest.mark.parametrize("old", [None, b"previous good archive"])
def test_wrong_checksum_leaves_nothing(server: Server, tmp_path: Path, old: bytes | None) -> None:
    body = zip_bytes(GOOD)
    actual = hashlib.sha256(body).hexdigest()
    wrong = "0" * 64
    url = server.add("/ircad.zip", body)
    dest = tmp_path / "dl" / "ircad.zip"
    if old is not None:
        dest.parent.mkdir()
        dest.write_bytes(old)

    with pytest.raises(DataError, match=rf"{re.escape(url)}.*checksum.*{wrong}.*{actual}"):
        fetch(url, dest, wrong, progress=False, timeout=5)

    if old is None:
        assert not dest.exists()
        assert listing(dest.parent) == []
    else:  # the earlier file survives a failed re-download
        assert dest.read_bytes() == old
        assert listing(dest.parent) == ["ircad.zip"]


def test_truncated_download(server: Server, tmp_path: Path) -> None:
    body = zip_bytes(GOOD)
    url = server.add("/short.zip", body, "truncated")
    dest = tmp_path / "dl" / "short.zip"
    n, announced = len(body), len(body) + TRUNCATED_EXTRA
    with pytest.raises(
        DataError, match=rf"{re.escape(url)}: truncated download: received {n} of {announced}"
    ):
        fetch(url, dest, progress=False, timeout=5)
    assert not dest.exists()
    assert listing(dest.parent) == []


@pytest.mark.parametrize(
    ("source", "sha", "pattern"),
    [
        ("{base}/missing.zip", "", r"HTTP error 404"),
        ("ftp://127.0.0.1/ircad.zip", "", r"unsupported URL scheme 'ftp'"),
        ("{tmp}/nowhere.zip", "", r"nowhere\.zip: cannot open: .*No such file"),
        ("file://{tmp}/nowhere.zip", "", r"nowhere\.zip: cannot open: .*No such file"),
        ("{tmp}", "", r"cannot open: .*Is a directory"),
        ("file://example.org/x.zip", "", r"remote host"),
        ("{base}/ircad.zip", "abc123", r"'abc123' is not a 64-digit hex"),
        ("{base}/ircad.zip", "g" * 64, r"is not a 64-digit hex"),
    ],
)
def test_bad_sources(server: Server, tmp_path: Path, source: str, sha: str, pattern: str) -> None:
    server.add("/ircad.zip", zip_bytes(GOOD))
    src = source.format(base=server.base, tmp=tmp_path)
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(DataError, match=pattern):
        fetch(src, dest, sha, progress=False, timeout=5)
    assert listing(dest.parent) == []


@pytest.mark.parametrize("as_url", [False, True])
def test_local_source(tmp_path: Path, as_url: bool) -> None:
    archive = write_zip(tmp_path / "local.zip", GOOD)
    want = hashlib.sha256(archive.read_bytes()).hexdigest()
    source = archive.as_uri() if as_url else str(archive)
    dest = tmp_path / "dl" / "copy.zip"
    assert fetch(source, dest, want, progress=False) == want
    assert dest.read_bytes() == archive.read_bytes()
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(source, tmp_path / "dl" / "other.zip", "f" * 64, progress=False)
    assert listing(dest.parent) == ["copy.zip"]


# ---------------------------------------------------------------------------------- extract
def _assert_refused_cleanly(tmp_path: Path, target: Path, archive: Path) -> None:
    assert not target.exists()
    # nothing written anywhere: no entry outside the target, no temporary folder beside it
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == [archive]
    assert listing(target.parent) == []


@pytest.mark.parametrize(
    "evil", ["../evil.txt", "a/../../evil.txt", "..\\evil.txt", "/evil.txt", "C:/evil.txt"]
)
def test_zip_slip_refused(tmp_path: Path, evil: str) -> None:
    archive = write_zip(tmp_path / "slip.zip", [("good.txt", b"fine"), (evil, b"pwned")])
    target = tmp_path / "out" / "raw"
    with pytest.raises(DataError, match=rf"slip\.zip: entry {re.escape(repr(evil))}.*zip slip"):
        safe_extract_zip(archive, target, max_bytes=10_000)
    _assert_refused_cleanly(tmp_path, target, archive)


@pytest.mark.parametrize(
    ("name", "lands_at"),
    [("a/../b.txt", "b.txt"), ("./c.txt", "c.txt"), ("dir\\d.txt", "dir/d.txt")],
)
def test_names_that_stay_inside_are_normalised(tmp_path: Path, name: str, lands_at: str) -> None:
    archive = write_zip(tmp_path / "ok.zip", [(name, b"data")])
    target = tmp_path / "raw"
    assert safe_extract_zip(archive, target, max_bytes=100) == [target / lands_at]
    assert (target / lands_at).read_bytes() == b"data"


@pytest.mark.parametrize(
    ("mode", "pattern"),
    [
        (stat.S_IFLNK | 0o777, r"symlink entries are refused"),
        (stat.S_IFIFO | 0o644, r"special file"),
    ],
)
def test_symlink_and_special_entries_refused(tmp_path: Path, mode: int, pattern: str) -> None:
    archive = write_zip(
        tmp_path / "link.zip",
        [("good.txt", b"fine"), (entry_with_mode("link", mode), b"/etc/passwd")],
    )
    target = tmp_path / "out" / "raw"
    with pytest.raises(DataError, match=rf"link\.zip: entry 'link': {pattern}"):
        safe_extract_zip(archive, target, max_bytes=10_000)
    _assert_refused_cleanly(tmp_path, target, archive)


def test_regular_file_mode_is_accepted(tmp_path: Path) -> None:
    archive = write_zip(
        tmp_path / "m.zip", [(entry_with_mode("f.txt", stat.S_IFREG | 0o644), b"x")]
    )
    assert safe_extract_zip(archive, tmp_path / "raw", max_bytes=1) == [tmp_path / "raw" / "f.txt"]


# entries of 400 + 600 bytes = 1000 bytes uncompressed in all
@pytest.mark.parametrize(("max_bytes", "ok"), [(1000, True), (999, False), (400, False)])
def test_total_size_limit(tmp_path: Path, max_bytes: int, ok: bool) -> None:
    archive = write_zip(tmp_path / "big.zip", [("a.bin", b"a" * 400), ("b.bin", b"b" * 600)])
    target = tmp_path / "out" / "raw"
    if ok:
        assert len(safe_extract_zip(archive, target, max_bytes=max_bytes)) == 2
        return
    with pytest.raises(
        DataError, match=rf"entry 'b\.bin': total uncompressed size 1000 .*max_bytes={max_bytes}"
    ):
        safe_extract_zip(archive, target, max_bytes=max_bytes)
    _assert_refused_cleanly(tmp_path, target, archive)


@pytest.mark.parametrize(("size", "ok"), [(4 << 20, False), (64 << 10, True)])
def test_compression_ratio_limit(tmp_path: Path, size: int, ok: bool) -> None:
    # bzip2 packs zeros far beyond 1000:1; entries under 1 MiB are exempt from the ratio rule
    archive = write_zip(
        tmp_path / "bomb.zip", [("zeros.bin", bytes(size))], compression=zipfile.ZIP_BZIP2
    )
    target = tmp_path / "out" / "raw"
    if ok:
        (path,) = safe_extract_zip(archive, target, max_bytes=size)
        assert path.stat().st_size == size
        return
    with pytest.raises(DataError, match=r"entry 'zeros\.bin': compression ratio \d+:1"):
        safe_extract_zip(archive, target, max_bytes=100 << 20)
    _assert_refused_cleanly(tmp_path, target, archive)


def test_duplicate_entries_refused(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "dup.zip", [("a.txt", b"1"), ("x/../a.txt", b"2")])
    target = tmp_path / "out" / "raw"
    with pytest.raises(
        DataError, match=r"entry 'x/\.\./a\.txt': duplicate entry for path 'a\.txt'"
    ):
        safe_extract_zip(archive, target, max_bytes=100)
    _assert_refused_cleanly(tmp_path, target, archive)


def _flip_data_byte(raw: bytes, name: str) -> bytes:
    offset = 30 + len(name) + 10  # local header, name, no extra field, then stored data
    return raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1 :]


def _understate_size(raw: bytes, size: int) -> bytes:
    cd = raw.index(b"PK\x01\x02")  # central directory record: uncompressed size at +24
    return raw[: cd + 24] + struct.pack("<I", size) + raw[cd + 28 :]


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda raw: b"this is not a zip file at all" * 10, r"not a valid zip"),
        (lambda raw: raw[: len(raw) // 2], r"not a valid zip"),
        (lambda raw: _flip_data_byte(raw, "data.bin"), r"entry 'data\.bin': corrupt"),
        (lambda raw: _understate_size(raw, 10), r"entry 'data\.bin': corrupt"),
    ],
    ids=["garbage", "cut-in-half", "bad-crc", "lying-size"],
)
def test_corrupt_archive(tmp_path: Path, damage: Callable[[bytes], bytes], pattern: str) -> None:
    raw = zip_bytes([("data.bin", b"A" * 1000)], compression=zipfile.ZIP_STORED)
    archive = tmp_path / "bad.zip"
    archive.write_bytes(damage(raw))
    target = tmp_path / "out" / "raw"
    with pytest.raises(DataError, match=rf"bad\.zip.*{pattern}"):
        safe_extract_zip(archive, target, max_bytes=10_000)
    _assert_refused_cleanly(tmp_path, target, archive)


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.zip: archive does not exist"):
        safe_extract_zip(tmp_path / "absent.zip", tmp_path / "raw", max_bytes=100)


def test_refusal_keeps_previous_target_and_success_replaces_it(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_bytes(b"old")
    bad = write_zip(tmp_path / "bad.zip", [("new.txt", b"new"), ("../evil.txt", b"x")])
    with pytest.raises(DataError, match="zip slip"):
        safe_extract_zip(bad, target, max_bytes=100)
    assert listing(target) == ["old.txt"]

    good = write_zip(tmp_path / "good.zip", [("new.txt", b"new")])
    assert safe_extract_zip(good, target, max_bytes=100) == [target / "new.txt"]
    assert listing(target) == ["new.txt"]
