"""Atomic file writes and checkpoints: a crash mid-write never leaves a half-written file.

A write the file system refuses (a read-only directory or file system, a full disk or quota) is a
one-line `LongtailError` naming the file: the temporary file is removed and the old file is untouched.

Appended logs (`metrics.jsonl`) are the exception: a run killed mid-write can leave a torn last
line, which `read_jsonl` drops. A set of files that describes one result together is written into a
directory beside its target and switched into place (`replace_directory`). Every command that writes
into a run directory holds its lock (`run_lock`) for its whole life.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from longtail.errors import ConfigError, LongtailError


_UMASK = os.umask(0)
os.umask(_UMASK)
# What the file system answers when it will not take a write; anything else (a bug, EIO) keeps its traceback.
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def unwritable(path: Path, exc: OSError, kept: str) -> LongtailError:
    """The one-line error for a refused write of `path`; `kept`: what is still as it was."""
    code = errno.errorcode.get(exc.errno, exc.errno)
    return LongtailError(f"cannot write {path}: {exc.strerror or exc} ({code}); nothing was lost: {kept}. "
                         "Free space or make the directory writable, then rerun")


def make_directory(path: str | Path) -> Path:
    """`mkdir -p`; a file where a directory of the path must be is a one-line error naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"cannot make the directory {path}: {blocker} is a file, not a directory; "
                          "choose another path") from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the file {path}: it is a directory; choose another path")
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no partial {path.name} was left"
    try:
        make_directory(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in UNWRITABLE:
            raise unwritable(path, exc, kept) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
            raise unwritable(path, exc, kept) from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a log such as metrics.jsonl; a refused write is a one-line error (a torn last line is
    dropped by `read_jsonl` and rewritten by --resume)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        if exc.errno in UNWRITABLE:
            raise unwritable(path, exc, f"{path.name} keeps every complete line and --resume continues it") from None
        raise


def remove_stale_temporaries(directory: str | Path) -> None:
    """The `.NAME.XXXXXXXX.tmp` files of atomic writes that a killed process left behind (up to a checkpoint's
    size each). Only under the directory's `run_lock`: nobody else can be writing one."""
    for path in Path(directory).glob(".*.tmp"):
        path.unlink(missing_ok=True)


LOCK_FILE = ".lock"
_held_locks: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the parent's lock; closing its copy lets the lock die
    # with the parent, not with the last worker, so a resume right after a SIGKILL is not refused.
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of a run directory (made if missing) for the with-block, or refuse at once.

    An OS lock (flock on DIR/.lock, which records the holder's pid): it ends with the process, however it
    ends, so a SIGKILLed run never blocks its own --resume.
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    created = not directory.exists()
    before = set(directory.iterdir()) if directory.is_dir() and not path.exists() else None
    try:
        make_directory(directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create its lock file {path.name} ({exc.strerror}); "
                          "a run directory must be writable") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{directory} is in use by another longtail command (pid {holder}); wait for it "
                              "to end, or write into another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks.add(fd)
        # Whatever a killed writer of this directory left half done, now that none can be at work.
        remove_stale_temporaries(directory)
        for old in (path for path in directory.glob(".*.old") if path.is_dir()):
            finish_replacement(directory / old.name[1:-len(".old")])
        for new in (path for path in directory.glob(".*.new") if path.is_dir()):
            shutil.rmtree(new)
        yield directory
    finally:
        # A command refused before writing anything leaves no directory, and no lock file in a user's directory.
        if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
            path.unlink()
            directory.rmdir()
        elif before is not None and set(directory.iterdir()) == before | {path}:
            path.unlink()
        _held_locks.discard(fd)
        os.close(fd)  # releases the lock


def _switch_names(target: Path) -> tuple[Path, Path]:
    """Where `replace_directory` writes a new `target` and puts the old one aside meanwhile."""
    return target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")


def new_directory(target: str | Path) -> Path:
    """An empty directory beside `target` to write its new contents into, for `replace_directory`. Under
    the lock of `target`'s parent, which has removed any earlier one."""
    new, _ = _switch_names(Path(target))
    new.mkdir()
    return new


def replace_directory(target: str | Path) -> None:
    """Put the complete directory `new_directory(target)` in place of `target`: a reader sees the old set of
    files or the new one, never a mix. A directory cannot be renamed onto another, so the old one is renamed
    aside first; the stop signals wait until both renames are done. A SIGKILL between them leaves `target`
    missing beside its `.old` and `.new`, which `finish_replacement` puts right."""
    target = Path(target)
    new, old = _switch_names(target)
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        if target.exists():
            os.rename(target, old)
        os.rename(new, target)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def finish_replacement(target: str | Path) -> None:
    """Put right what an interrupted `replace_directory` of `target` left. `.old` exists only once `.new` is
    complete, so with `target` missing the new set goes into place; a `.new` without `.old` is a partial
    write and is removed. The caller holds the lock of the directory holding `target`."""
    target = Path(target)
    new, old = _switch_names(target)
    if old.exists() and not target.exists():
        os.rename(new if new.exists() else old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | Path) -> dict:
    """A JSON object written by longtail (results.json, eval-*.json); an empty, truncated or foreign file is a
    ConfigError naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is empty, truncated or not JSON ({exc}); it was not written completely: rerun the "
                          "command that writes it, or leave this run out") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a {type(record).__name__}")
    return record


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a file with one per line (blank lines skipped).

    An unparseable (or non-object) *last* line is dropped: it is the torn record of a run killed
    mid-write. An unparseable line anywhere else is a ConfigError naming the file and line number.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records: list[dict] = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if position == len(numbered) - 1:
                break  # a torn last line
            raise ConfigError(f"{path}, line {number}: not a JSON object ({exc}); only the last line may be "
                              f"torn (a run killed mid-write), so this file is damaged") from None
        records.append(record)
    return records


def _zip_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete zip archive (torch.save's format), or None when it is one."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"not a complete zip archive: {exc}"
    return None if bad is None else f"member {bad} fails its CRC check"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", kind: str = "checkpoint") -> Any:
    """Load with `weights_only=True`: tensors, numbers, strings and containers only, no code.

    A file that fails to load is diagnosed: one that is not a complete zip archive (a crash or a full
    disk while copying, a partial download, a file of another kind) is reported as truncated or corrupt;
    one that is whole but holds something `weights_only` refuses keeps torch's explanation. `kind` names
    the file in messages: a training "checkpoint" (which a run can restart without), or a "model file".
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{kind} {path} is a directory; expected a file written by torch.save")
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-1.6 format is a bare pickle, not a zip
        problem = None if legacy else _zip_problem(path)
        if problem is not None:
            remedy = ("restart without it" if kind == "checkpoint" else
                      "it is not a whole file written by torch.save; copy it again from where it was made")
            raise ConfigError(f"{kind} {path} is truncated or corrupt ({path.stat().st_size} bytes, {problem}): "
                              f"{remedy}") from None
        raise ConfigError(f"{kind} {path} cannot be loaded safely: {exc}") from None
