"""Where a run's artifacts live: a local folder, a shared mount, or an object store (``s3://``, ``gs://``, ...).

Every location is a string: a local path or a URI. ``pyarrow.fs`` does the work (the same filesystems Ray Train and
Ray Data use), so credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance roles, ...).

    join(root, "sequences", "ab12cd34")       # "s3://bucket/runs/sequences/ab12cd34" or "/abs/runs/sequences/..."
    upload_dir(local_folder, uri)             # a stage's model folder -> the run's storage
    folder = local_dir(uri, cache)            # a local copy to load from (the folder itself when it is local)

On a local path, writes are atomic (a temporary name, then a rename); an object store has no rename, so whoever reads
a folder waits for a marker file that is written last (a stage's ``stage.json``).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` with a scheme longer than a drive letter (``file://`` counts as a URI)."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    return not is_uri(location) or urlparse(str(location)).scheme == "file"


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a path or a ``file://`` URI (ValueError for a remote URI)."""
    text = str(location)
    if not is_uri(text):
        return Path(text).expanduser().resolve()
    parsed = urlparse(text)
    if parsed.scheme != "file":
        raise ValueError(f"{text} is not a local path")
    return Path(parsed.path)


def normalize(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI without a trailing slash."""
    return str(local_path(location)) if is_local(location) else str(location).rstrip("/")


def join(root: str | os.PathLike, *parts: str) -> str:
    root = normalize(root)
    return "/".join([root, *(p.strip("/") for p in parts)]) if is_uri(root) else str(Path(root, *parts))


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location."""
    if is_local(location):
        return pafs.LocalFileSystem(), str(local_path(location))
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot open storage {location}: {e}") from None


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | os.PathLike) -> int:
    fs, path = filesystem(location)
    return fs.get_file_info(path).size or 0


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def open_input(location: str | os.PathLike):
    """A binary, seekable file object (local or remote)."""
    if is_local(location):
        return open(local_path(location), "rb")
    fs, path = filesystem(location)
    return io.BufferedReader(fs.open_input_file(path), buffer_size=1 << 20)  # lines, like a local file


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small text file; on a local path atomically (temporary name, then rename)."""
    if is_local(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def remove_dir(location: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload_dir(folder: str | Path, location: str | os.PathLike) -> None:
    """Copy a local folder to ``location`` (replacing what was there). Locally: into a temporary sibling, then one
    rename, so a reader never sees half a folder."""
    if is_local(location):
        dst = local_path(location)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copytree(folder, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return
    fs, path = filesystem(location)
    remove_dir(location)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(location: str | os.PathLike, folder: str | Path) -> Path:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such folder")
    Path(folder).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(folder), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(folder)


def cache_root() -> Path:
    return Path(os.environ.get("GORP_CACHE", Path.home() / ".cache" / "gorp"))


def local_dir(location: str | os.PathLike, cache: str | Path | None = None) -> Path:
    """A local folder holding ``location``'s files: the folder itself when local, else a copy under ``cache``
    (default ``$GORP_CACHE/remote``), downloaded once (a complete copy is renamed into place)."""
    if is_local(location):
        return local_path(location)
    root = Path(cache or cache_root() / "remote")
    dst = root / hashlib.sha256(str(location).encode()).hexdigest()[:16]
    if dst.is_dir():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        download_dir(location, tmp)
        try:
            os.rename(tmp, dst)
        except OSError:  # a concurrent download finished first: keep that one
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: a local path as is; an object store as
    the path inside its filesystem (Ray wants ``bucket/key`` with the filesystem, not ``s3://``)."""
    if is_local(location):
        return str(local_path(location)), None
    fs, path = filesystem(location)
    return path, fs
