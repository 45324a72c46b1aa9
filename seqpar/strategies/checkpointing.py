"""Crash-safe checkpoints: atomic writes, and finding the newest *complete* checkpoint to resume from.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction; for local paths fsspec stages the
file with ``tempfile.mkstemp()`` in the *system* temp directory and ``shutil.move``s it on commit, which is a
copy (not a rename) whenever ``/tmp`` and the checkpoint directory are different filesystems: a process
killed during that copy leaves a truncated ``.ckpt``. :class:`AtomicCheckpointIO` writes
``<path>.tmp.<pid>`` next to the target, fsyncs it, and ``os.replace``s it onto ``path`` (atomic on POSIX),
so a checkpoint path only ever holds a complete file.

Checksums: every atomic save also writes ``<path>.sha256`` (SHA-256 of the bytes as written, hashed while
they stream to disk, and the size), atomically and *after* the checkpoint, so a sidecar describes a complete
file. :func:`verify_checkpoint` recomputes it (streaming, 8 MiB blocks): a payload overwritten in place
(zip structure intact, e.g. a bad disk block) is caught, which :func:`checkpoint_is_complete` cannot see.
A checkpoint without a sidecar (written by other code) is accepted when complete.

:func:`find_resume_checkpoint` picks the newest ``*.ckpt`` of a directory that verifies, skipping truncated,
corrupt or mismatching files with one warning line that names them, the reasons and the choice.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from typing import Any, List, Optional, Tuple

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "checkpoint_is_complete", "find_resume_checkpoint",
           "verify_checkpoint", "checksum_path", "file_sha256", "check_writable_dir"]

TMP_MARK = ".tmp."
CHECKSUM_SUFFIX = ".sha256"
_BLOCK = 8 << 20


def checksum_path(path: str) -> str:
    """The checksum sidecar of checkpoint ``path``: ``<path>.sha256``."""
    return f"{path}{CHECKSUM_SUFFIX}"


def file_sha256(path: str) -> Tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, read in 8 MiB blocks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_BLOCK)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


class _HashingWriter:
    """File wrapper that hashes what ``torch.save`` writes (it only appends); any other call marks it unusable."""

    def __init__(self, f):
        self.f, self.h, self.n, self.sequential = f, hashlib.sha256(), 0, True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name):  # seek / tell / ...: the stream hash may not be the file's any more
        self.sequential = False
        return getattr(self.f, name)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through ``path.tmp.<pid>`` + fsync + ``os.replace``: never a partial ``path``;
    then ``path.sha256`` (hex digest, size, name), written the same way."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        digest = w.h.hexdigest() if w.sequential and w.n == size else file_sha256(tmp)[0]
        # the checkpoint first, its checksum last: a sidecar always describes a complete file (a crash in
        # between leaves the new file with the old sidecar: it fails verification and is skipped)
        os.replace(tmp, path)
        _write_atomic(checksum_path(path), f"{digest}  {size}  {os.path.basename(path)}\n".encode())
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file in the same directory + rename).

    Remote paths (``s3://`` ...) keep Lightning's behaviour. Use ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, str(path))

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint and its checksum sidecar (e.g. checkpoints beyond ``save_top_k``)."""
        super().remove_checkpoint(path)
        if _is_local(path):
            side = checksum_path(str(path)[len("file://"):] if str(path).startswith("file://") else str(path))
            if os.path.exists(side):
                os.remove(side)


def checkpoint_is_complete(path: str) -> Tuple[bool, str]:
    """(ok, reason): ``path`` is a complete ``torch.save`` zip archive (central directory present, the pickle
    readable with a valid CRC). Cheap: the tensor payloads are not read."""
    try:
        if os.path.getsize(path) == 0:
            return False, "empty file"
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                return False, "no data.pkl in the archive (not a torch.save file)"
            zf.read(pkl[0])  # checks the CRC of the pickle
            for info in zf.infolist():  # every member must lie inside the file
                if info.header_offset + info.compress_size > os.path.getsize(path):
                    return False, f"member {info.filename} extends past the end of the file"
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def verify_checkpoint(path: str) -> Tuple[bool, str]:
    """(ok, reason): ``path`` is complete and, when ``<path>.sha256`` exists, matches its size and SHA-256.

    Reads the whole file once (streaming); a checkpoint without a sidecar is checked for completeness only.
    """
    ok, why = checkpoint_is_complete(path)
    if not ok:
        return ok, why
    side = checksum_path(path)
    if not os.path.exists(side):
        return True, ""
    try:
        with open(side) as f:
            fields = f.read().split()
        want, want_size = fields[0], int(fields[1])
    except (OSError, ValueError, IndexError) as e:
        return False, f"unreadable checksum file {os.path.basename(side)} ({type(e).__name__})"
    try:
        got, size = file_sha256(path)
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    if size != want_size:
        return False, f"size {size} != {want_size} recorded in {os.path.basename(side)}"
    if got != want:
        return False, f"SHA-256 mismatch with {os.path.basename(side)} (corrupted payload)"
    return True, ""


def find_resume_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The newest (by modification time, then name) verified ``*.ckpt`` in ``ckpt_dir``; ``None`` if none.

    Temporary files of interrupted saves (``*.tmp.<pid>``) are ignored; checkpoints that fail
    :func:`verify_checkpoint` are skipped, with one warning line naming each file, its reason and the choice.
    """
    if not os.path.isdir(ckpt_dir):
        return None
    cands: List[Tuple[float, str]] = []
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if name.endswith(".ckpt") and TMP_MARK not in name and os.path.isfile(p):
            cands.append((os.path.getmtime(p), name))
    skipped: List[str] = []
    chosen = None
    for _, name in sorted(cands, reverse=True):
        p = os.path.join(ckpt_dir, name)
        ok, why = verify_checkpoint(p)
        if ok:
            chosen = p
            break
        skipped.append(f"{name} ({why})")
    if skipped:
        warnings.warn(f"resume=auto: skipping {len(skipped)} incomplete or corrupt checkpoint(s) in {ckpt_dir}: "
                      f"{'; '.join(skipped)}; resuming from {chosen or 'scratch (none verifies)'}", stacklevel=2)
    return chosen


def check_writable_dir(directory: str) -> Optional[str]:
    """None if checkpoints can be written into ``directory`` (created if missing), else a one-line reason.

    Creates and removes a small probe file, so permissions, read-only mounts and a full disk show up now
    rather than at the first save.
    """
    directory = str(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"cannot create checkpoint directory {directory}: {e.strerror or e}"
    if not os.path.isdir(directory):
        return f"checkpoint directory {directory} is not a directory"
    probe = os.path.join(directory, f".write_probe{TMP_MARK}{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"checkpoint directory {directory} is not writable: {e.strerror or e}"
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None
