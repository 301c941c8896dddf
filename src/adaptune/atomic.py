"""Crash-safe file writing: every file adaptune writes appears whole or not at all.

A file is written under a temporary name in its own directory, flushed and fsynced, then
``os.replace``d over the destination, and the directory is fsynced so the rename itself survives
a power cut. A process killed at any moment therefore leaves either the old file or the new one,
never a torn mix. Folders (an adapter folder, a merged model) are built in a sibling temporary
folder and swapped in the same way.

Temporary names start with a dot (``.adapter_model.tmp-k2x9.safetensors``,
``.checkpoint-10.tmp-k2x9``) so that they match no pattern a reader looks for, such as
transformers' ``checkpoint-*``, and they keep the destination's extension, so writers that pick
a format from the name (matplotlib's ``savefig``) still do the right thing.

``metrics.jsonl`` is the one file that grows in place: :func:`append_jsonl` appends one line at a
time and :func:`read_jsonl` ignores a final line that a kill cut short.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DataError, EnvironmentProblem

__all__ = [
    "append_jsonl",
    "atomic_directory",
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable",
    "read_jsonl",
    "remove_temporaries",
]

# mkstemp creates files with mode 0600; a finished file should get the mode a plain open() would
# give it. Reading the umask means setting it, so it is done once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync a file or directory by name (directories only where the OS allows opening them)."""
    if directory and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath, directory=True)


def _remove(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name next to ``path``; on a clean exit it replaces ``path``.

    For writers that need a file name (``fig.savefig(tmp)``, ``torch.save(obj, tmp)``). The
    temporary file exists (empty) when the block starts; the writer may overwrite it. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically.

    The object is serialised before anything touches the disk, so an unserialisable value raises
    ``TypeError`` with the old file untouched.
    """
    atomic_write_text(path, json.dumps(obj, sort_keys=sort_keys, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save a ``{name: torch.Tensor}`` dict as a safetensors file atomically.

    Written straight to the temporary file (not built in memory first), so a multi-GB shard of a
    merged model does not need twice its size in RAM.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder to build in; on a clean exit it becomes ``dest``.

    An existing ``dest`` is renamed aside, the new folder renamed into place, then the old one
    deleted; every file is fsynced before the swap. On an exception the half-built folder is
    deleted and ``dest`` is left as it was. (Between the two renames a kill can leave no
    ``dest`` and the old folder under ``.<name>.old-*``: never a half-written ``dest``.)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if dest.exists() or dest.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rmdir(aside)  # only the unique name is wanted
        os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if aside is not None:
            os.rename(aside, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(dest.parent, directory=True)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _remove(aside)


def _drop_torn_tail(f) -> None:
    """Truncate an append-mode binary file after its last newline (a line a kill cut short)."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos, block = end, 4096
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            f.truncate(start + idx + 1)
            return
        pos = start
    f.truncate(0)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path``, flushed and fsynced.

    A final line left incomplete by an earlier kill is dropped first, so the file never holds a
    broken line in the middle.
    """
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        _drop_torn_tail(f)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by :func:`append_jsonl`.

    A last line without its newline is what a kill mid-append leaves: it is skipped. Blank lines
    are skipped. Any other line that is not JSON raises :class:`DataError` naming the line.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    lines.pop()  # the piece after the last newline: empty, or a torn final line
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return records


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left directly in ``directory``; returns what was removed.

    That is ``.<name>.tmp-*`` files and folders (a write that never reached its rename) and
    ``check_writable``'s probe files. Call it only where nothing else is writing, such as before a
    job starts writing its output folder. ``.<name>.old-*`` folders are kept: a kill between the
    two renames of :func:`atomic_directory` leaves the old folder there and nothing under the name.
    """
    d = Path(directory)
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and (".tmp-" in name or name.startswith(".adaptune-write-test-"))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_writable(directory: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Make sure ``directory`` exists, can be written, and its disk has ``need_bytes`` free.

    Called before training starts, so a bad ``output_dir`` fails in the first second instead of at
    the first checkpoint. Writability is tested by creating and deleting a file (``os.access`` is
    wrong for root and for read-only mounts). Raises :class:`EnvironmentProblem` with one line.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise EnvironmentProblem(f"output directory {d} exists and is not a directory; choose another output directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise EnvironmentProblem(
            f"cannot create output directory {d}: {reason}; choose another output directory"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".adaptune-write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise EnvironmentProblem(
            f"output directory {d} is not writable: {reason}; choose another output directory"
        ) from None
    if need_bytes > 0:
        free = shutil.disk_usage(d).free
        if free < need_bytes:
            raise EnvironmentProblem(
                f"only {_human(free)} free on the disk of {d}, but about {_human(need_bytes)} is needed; "
                "free some space or choose another output directory"
            )
    return d
