"""Crash-safe checkpoints: atomic writes, and finding the newest *complete* checkpoint to resume from.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction; for local paths fsspec stages the
file with ``tempfile.mkstemp()`` in the *system* temp directory and ``shutil.move``s it on commit, which is a
copy (not a rename) whenever ``/tmp`` and the checkpoint directory are different filesystems: a process
killed during that copy leaves a truncated ``.ckpt``. :class:`AtomicCheckpointIO` writes
``<path>.tmp.<pid>`` next to the target, fsyncs it, and ``os.replace``s it onto ``path`` (atomic on POSIX),
so a checkpoint path only ever holds a complete file.

:func:`find_resume_checkpoint` picks the newest ``*.ckpt`` of a directory that passes
:func:`checkpoint_is_complete` (a readable zip archive with its central directory and pickle), warning about
and skipping truncated or corrupt files (e.g. written by another tool, or a disk that filled up).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any, List, Optional, Tuple

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "checkpoint_is_complete", "find_resume_checkpoint"]

TMP_MARK = ".tmp."


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
    """``torch.save(obj, path)`` through ``path.tmp.<pid>`` + fsync + ``os.replace``: never a partial ``path``."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def find_resume_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The newest (by modification time, then name) complete ``*.ckpt`` in ``ckpt_dir``; ``None`` if none.

    Temporary files of interrupted saves (``*.tmp.<pid>``) are ignored; incomplete or corrupt checkpoints are
    skipped with a warning naming the file and the reason.
    """
    if not os.path.isdir(ckpt_dir):
        return None
    cands: List[Tuple[float, str]] = []
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if name.endswith(".ckpt") and TMP_MARK not in name and os.path.isfile(p):
            cands.append((os.path.getmtime(p), name))
    for _, name in sorted(cands, reverse=True):
        p = os.path.join(ckpt_dir, name)
        ok, why = checkpoint_is_complete(p)
        if ok:
            return p
        warnings.warn(f"resume=auto: skipping incomplete or corrupt checkpoint {p} ({why})", stacklevel=2)
    return None
