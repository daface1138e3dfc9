"""Fetch and unpack the IRCAD archive without ever leaving a half-written or hostile result.

Contracts:

* :func:`fetch` streams ``source`` (an ``http(s)://`` URL, a ``file://`` URL or a local path)
  into a temporary file beside ``dest`` and renames it into place only once the byte count
  matches the announced size (the server's ``Content-Length`` when it sent one, the file size
  for a local source) and the SHA-256 matches the expected digest (when one is given). On any
  failure ``dest`` is left as it was (absent for a first download) and no temporary file
  remains.
* :func:`safe_extract_zip` checks every entry of the archive *before* writing anything, then
  extracts into a temporary folder beside ``target`` that replaces ``target`` only when every
  entry was written; a refused or corrupt archive leaves ``target`` as it was.

Every failure is a :class:`~liverseg.errors.DataError` naming the source or archive (and the
entry) and the problem.
"""

from __future__ import annotations

import hashlib
import http.client
import posixpath
import re
import shutil
import stat
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir, atomic_file

__all__ = ["MAX_RATIO", "RATIO_MIN_BYTES", "fetch", "safe_extract_zip"]

# Read size for streaming: large enough for throughput, small enough to keep memory flat.
CHUNK_BYTES = 1 << 20
# Zip-bomb heuristic: an entry larger than RATIO_MIN_BYTES whose uncompressed size is more than
# MAX_RATIO times its compressed size is refused. CT data (NIfTI/DICOM) compresses far less;
# small entries are exempt because a few KB of zeros legitimately compress that well.
RATIO_MIN_BYTES = 1 << 20
MAX_RATIO = 1000.0

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ROOTED = re.compile(r"^(/|[A-Za-z]:)")  # an absolute POSIX path or a Windows drive


# ------------------------------------------------------------------------------------ download
def fetch(
    source: str,
    dest: Path,
    sha256: str = "",
    *,
    progress: bool = True,
    timeout: float = 60,
) -> str:
    """Download (or copy) ``source`` to ``dest`` and return the hex SHA-256 of its bytes.

    The digest is computed while streaming, so a pinned ``sha256`` costs no second read; with
    ``sha256`` empty the digest is still returned, so that a first download can be pinned.
    ``timeout`` (seconds) bounds each network operation, not the whole transfer, so a slow but
    live connection is not cut off while a stalled one is.
    """
    dest = Path(dest)
    expected = sha256.strip().lower()
    if expected and not _HEX64.fullmatch(expected):
        raise DataError(f"{source}: expected sha256 {sha256!r} is not a 64-digit hex digest")

    digest = hashlib.sha256()
    with (
        _open_source(source, timeout) as (stream, length),
        atomic_file(dest) as tmp,
        tmp.open("wb") as out,
        tqdm(
            total=length,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            disable=not progress,
        ) as bar,
    ):
        received = 0
        try:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
                received += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            # A reset or timed-out connection: the same failure as a short body, but say why.
            of = "" if length is None else f" of {length}"
            raise DataError(
                f"{source}: truncated download: received {received}{of} bytes before "
                f"the transfer failed ({type(exc).__name__}: {exc})"
            ) from exc
        if length is not None and received != length:
            raise DataError(f"{source}: truncated download: received {received} of {length} bytes")
        actual = digest.hexdigest()
        if expected and actual != expected:
            raise DataError(
                f"{source}: SHA-256 checksum mismatch: expected {expected}, got {actual}"
            )
    return actual


@contextmanager
def _open_source(source: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open ``source`` (urllib reads http(s):// and file:// URLs, redirects followed) and yield
    it with its announced size (None if unknown)."""
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "" or _ROOTED.match(source):
        url = Path(source).absolute().as_uri()
    elif scheme == "file" and parts.netloc not in ("", "localhost"):
        raise DataError(f"{source}: file:// URL with a remote host is not supported")
    elif scheme in ("http", "https", "file"):
        url = source
    else:
        raise DataError(
            f"{source}: unsupported URL scheme {scheme!r} "
            "(expected http://, https://, file:// or a local path)"
        )
    request = urllib.request.Request(url, headers={"User-Agent": "liverseg-download"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DataError(f"{source}: HTTP error {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"{source}: cannot open: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DataError(f"{source}: request failed ({type(exc).__name__}: {exc})") from exc
    with response:
        header = response.headers.get("Content-Length")
        length = int(header) if header is not None and header.strip().isdigit() else None
        yield response, length


# ------------------------------------------------------------------------------------- unpack
def safe_extract_zip(
    archive: Path, target: Path, *, max_bytes: int, unpacked_before: int = 0
) -> list[Path]:
    """Extract ``archive`` into ``target`` (replacing it) and return the extracted file paths.

    The archive comes from the internet, so it is treated as hostile: entries that would land
    outside ``target`` (``../x``, ``/x``, ``C:x``; backslashes count as separators, ``..`` is
    resolved lexically), symlinks and other non-regular entries, encrypted entries, a total
    uncompressed size over ``max_bytes``, an entry compressed more than ``MAX_RATIO``:1 (when
    larger than ``RATIO_MIN_BYTES``), duplicate names and corrupt data (bad CRC, truncated
    archive) are refused. Every entry is checked from the central directory before anything is
    written; ``zipfile`` stops reading an entry at its declared size and then checks the CRC, so
    a header that under-states a size fails as corrupt. Returned paths are under ``target``, in
    archive order, files only (not folders). ``unpacked_before`` bytes (what earlier archives of
    one budget unpacked) count against ``max_bytes`` too.
    """
    archive = Path(archive)
    target = Path(target)
    if not archive.is_file():
        raise DataError(f"{archive}: archive does not exist or is not a file")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a valid zip archive: {exc}") from exc
    with zf:
        plan: dict[str, zipfile.ZipInfo] = {}
        total = unpacked_before
        for info in zf.infolist():
            where = f"{archive}: entry {info.filename!r}"
            # The extraction folder is brand new: no symlink on disk can redirect a lexically
            # safe path.
            name = info.filename.replace("\\", "/")
            rel = posixpath.normpath(name)
            if _ROOTED.match(name) or "\x00" in name or f"{rel}/".startswith("../"):
                raise DataError(f"{where}: path escapes the extraction folder (zip slip)")
            if rel == ".":
                continue  # the archive's root folder itself ("./")
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise DataError(f"{where}: symlink entries are refused")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"{where}: special file (mode {oct(kind)}) entries are refused")
            if info.flag_bits & 0x1:
                raise DataError(f"{where}: encrypted entries are not supported")
            if rel in plan:
                raise DataError(f"{where}: duplicate entry for path {rel!r}")
            total += info.file_size
            if total > max_bytes:
                before = (
                    f" ({unpacked_before} of them from earlier archives)" if unpacked_before else ""
                )
                raise DataError(
                    f"{where}: total uncompressed size {total} bytes{before} exceeds "
                    f"max_bytes={max_bytes}"
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > RATIO_MIN_BYTES and ratio > MAX_RATIO:
                raise DataError(
                    f"{where}: compression ratio {ratio:.0f}:1 ({info.file_size} bytes from "
                    f"{info.compress_size}) exceeds {MAX_RATIO:.0f}:1 (zip bomb?)"
                )
            plan[rel] = info
        written: list[Path] = []
        with atomic_dir(target) as tmp:
            for rel, info in plan.items():
                out = tmp.joinpath(*rel.split("/"))
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                where = f"{archive}: entry {info.filename!r}"
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK_BYTES)
                except (
                    zipfile.BadZipFile,
                    zlib.error,
                    EOFError,
                    NotImplementedError,
                    RuntimeError,
                ) as exc:
                    raise DataError(f"{where}: corrupt or unsupported data: {exc}") from exc
                except OSError as exc:
                    raise DataError(f"{where}: cannot write {out.name}: {exc}") from exc
                written.append(target.joinpath(*rel.split("/")))
    return written
