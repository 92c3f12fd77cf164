"""Digests of a model folder's weight files: recorded when a version is registered, checked when it is loaded.

    tag = json.dumps(weight_digests(folder))                      # {"model.safetensors": "<sha256>", ...}
    check_weights(folder, json.loads(tag), "tiny-stream version 2")   # IntegrityError naming the version and file

Weight files are ``*.safetensors`` (and ``*.bin``, ``*.pt``) anywhere in the folder (the model and the method's
state). A location may be a local folder or a URI (:mod:`pipelines.storage`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from pipelines import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TAG = "weights_sha256"


class IntegrityError(RuntimeError):
    """A file does not match the digest recorded for it."""


def _sha256(location: str) -> str:
    with storage.open_input(location) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weight_files(location: str | Path) -> list[str]:
    """The weight files under ``location``, as paths relative to it (``/``-separated), sorted."""
    fs, root = storage.filesystem(str(location))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    rel = [str(PurePosixPath(i.path).relative_to(PurePosixPath(root))) for i in infos if i.type == pafs.FileType.File]
    return sorted(r for r in rel if r.endswith(WEIGHT_SUFFIXES) and not PurePosixPath(r).name.startswith("."))


def weight_digests(location: str | Path) -> dict[str, str]:
    return {name: _sha256(storage.join(str(location), name)) for name in weight_files(location)}


def check_weights(folder: str | Path, recorded: dict[str, str], what: str) -> None:
    """Every recorded weight file is in ``folder`` with its recorded sha256; raises IntegrityError naming ``what``
    (the version) and the file."""
    for name, want in sorted(recorded.items()):
        path = storage.join(str(folder), name)
        if not storage.exists(path):
            raise IntegrityError(f"{what}: weight file {path} is missing (recorded at registration)")
        got = _sha256(path)
        if got != want:
            raise IntegrityError(
                f"{what}: weight file {path} is corrupt: sha256 {got[:12]}... where {want[:12]}... was recorded "
                "at registration; re-train or restore that file"
            )
