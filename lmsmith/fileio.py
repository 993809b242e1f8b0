"""Shared file I/O below every format: atomic directory and file writes, JSON, safetensors writing,
and the checks a reader makes before it trusts a path.

Atomic writes put the new content together under a temporary sibling name on the same file
system, fsync it, and rename it into place, so a crash never leaves a half-written file or
folder under the final name. Every writer of a checkpoint, adapter, shard folder, tokenizer,
GGUF file or run config goes through `atomic_dir` or `atomic_file`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import LmsmithError

# safetensors dtype strings <-> torch dtypes (the ones a Llama-family checkpoint uses).
ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def check_regular_file(path: str | os.PathLike, what: str = "file") -> int:
    """The size of `path` if it is a regular file; a one-line error for a FIFO, device, socket or folder
    (reading one of those would block forever or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LmsmithError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
        raise LmsmithError(f"{path}: is {kind}; give the {what} itself")
    return st.st_size


def write_json(file: str | os.PathLike, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())


def write_safetensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike,
                      dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                      fetch: Callable[[str], torch.Tensor] | None = None) -> int:
    """Stream tensors into a safetensors file, one at a time; return bytes of tensor data.

    Why not `safetensors.torch.save_file`: it serialises every tensor to bytes
    first (a second copy of the model in memory) and refuses tensors that share
    a storage, which memory-mapped loads always do.

    A sharded tensor (a DTensor: FSDP2 / tensor parallelism) is gathered when its turn comes
    (`full_tensor()`, a collective: the other ranks call `gather_in_turn` on the same tensors),
    so the writer holds one whole tensor at a time, never the whole model. A tensor on the meta device
    stands for one `fetch(name)` reads when its turn comes (a pipeline's stages from their checkpoint).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in ST_DTYPES:
            raise LmsmithError(f"tensor {name!r}: dtype {out_dtype} cannot be written to safetensors")
        n = tensor_nbytes(t, dtype)
        header[name] = {"dtype": ST_DTYPES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, t in tensors.items():
            if t.is_meta:
                t = fetch(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)  # before a gather, as gather_in_turn does on the other ranks
            t = _whole(t).to("cpu").contiguous()
            if t.numel():
                # uint8 view of the tensor's own memory: no copy unless conversion made one above.
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return offset


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_in_turn(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """What a rank that does not write does while `write_safetensors` writes `tensors` on another:
    join each sharded tensor's gather, in the same order, and drop the result."""
    for t in tensors.values():
        if hasattr(t, "full_tensor"):
            _whole(t.to(dtype) if dtype is not None and t.is_floating_point() else t)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` atomically.

    The temporary directory is `<path>.tmp-XXXX` in the same parent (same file
    system, so the rename is atomic). On any exception it is deleted and `path`
    is untouched. An existing `path` is renamed to `<path>.old-XXXX`, the new
    directory renamed in, and the old one deleted; a crash between those two
    renames leaves the previous checkpoint under `<path>.old-XXXX` (which
    `load` points to), never a half-written one under `path`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmsmithError(f"{path}: exists and is not a directory; choose another output path")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _make_public(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_atomic_dir(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmpdir)` and atomically move what it wrote to `path` (see `atomic_dir`)."""
    with atomic_dir(path) as tmp:
        writer(tmp)
    return Path(path)


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` at `path`, replacing any directory there (rename away, rename in, delete)."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
        os.rmdir(old)  # we only wanted a unique name
        os.rename(path, old)
    os.rename(new, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_public(d: Path) -> None:
    # mkdtemp creates 0700; a checkpoint should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)


def _fsync_tree(root: Path) -> None:
    """Flush every file (and directory) under root to disk before the rename makes it visible."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling file path for a writer that opens files by name (GGUFWriter); when the
    block ends without error the file is fsynced and renamed onto `path`. On any exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Yield an open temporary sibling file that replaces `path` atomically when the block succeeds
    (see `atomic_path`); text modes write UTF-8."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
        yield fh
