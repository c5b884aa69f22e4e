"""Artifacts on disk: written durably and atomically, and identified by content.

A crash (power loss, SIGKILL) must never leave a half-written checkpoint or adapter where a reader
would take it for a whole one. Files are written to a temporary name in the same folder, flushed
and fsynced, then renamed over the final name, and the folder is fsynced so the rename itself is
durable. ``tree_sha256`` identifies a folder (an adapter) by its files' names and contents, so the
registry can record what was registered and the server can refuse anything else.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneline.errors import Problem, TunelineError

ADAPTER_SHA_TAG = "tuneline.adapter_sha256"
# An adapter's model card (tuneline.registry.card). It is written after the version is registered
# (the card names the version), so the adapter's hash leaves it out; no loader reads it.
CARD_FILE = "README.md"
# What MLflow writes into a model folder it loads from ``models:/NAME@ALIAS``: the name and number
# it was loaded as. With a local artifact store it lands in the registered folder itself (every
# generative version is an MLflow model: tuneline.export.version_model), so the hash leaves it out.
MLFLOW_META_FILE = "registered_model_meta"
_CHUNK = 1 << 20


class ArtifactError(TunelineError):
    """An artifact on disk is missing, incomplete or not the one that was recorded."""


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder if missing) for the block:
    processes wait their turn; the lock is released when the holder ends, even by a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself)."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds either its old content or ``data``, never a part of it, even after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``target`` (same file system), durably.

    ``tmp`` is fsynced first. An existing ``target`` is moved aside, never deleted before the new
    one is in place: a crash between the two renames leaves ``target.old`` whole, and
    :func:`recover_dir` puts it back."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def copy_dir(src: str | Path, target: str | Path) -> None:
    """Copy the folder ``src`` to ``target``, durably: copied whole beside it first, then put in
    place by :func:`replace_dir` (a previous ``target`` stays whole until the copy is)."""
    src, target = Path(src), Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, target)


def recover_dir(target: str | Path) -> None:
    """After a crash inside :func:`replace_dir`: bring ``target.old`` back when ``target`` is gone."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
        fsync_dir(target.parent)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(root: str | Path, *, with_card: bool = False) -> str:
    """The SHA-256 of a folder: every file's path (relative, '/'-separated) and content hash, in
    sorted order. Equal for a folder and its copy (e.g. downloaded from the tracking store). The
    model card at the top (:data:`CARD_FILE`) is left out unless ``with_card``, and MLflow's
    :data:`MLFLOW_META_FILE` always."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(Problem(f"no such folder: {root}"))
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if (rel != CARD_FILE or with_card) and rel != MLFLOW_META_FILE:
            lines.append(f"{rel}\0{file_sha256(path)}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def tree_matches(root: str | Path, expected: str) -> bool:
    """Whether the folder is the one hashed as ``expected``: without its model card, or (a version
    registered before cards were left out of the hash) with the README.md it had then."""
    if tree_sha256(root) == expected:
        return True
    return (Path(root) / CARD_FILE).is_file() and tree_sha256(root, with_card=True) == expected


def verify_tree(root: str | Path, expected: str | None, what: str = "adapter") -> None:
    """Refuse a folder whose content is not the one recorded (``expected`` None: nothing recorded,
    nothing to check, e.g. a version registered before hashes were recorded)."""
    if expected is None or tree_matches(root, expected):
        return
    actual = tree_sha256(root)
    raise ArtifactError(Problem(
        f"the {what} at {root} has SHA-256 {actual[:16]}…, but {expected[:16]}… was recorded when it was registered",
        hint="the files were changed or are incomplete: download the version again, or register a new one"))
