"""The one module that writes hf_sft's outputs: destinations checked first, temporary siblings, fsync, rename.

Callers say what to write; this module says how, so that nothing is ever left half-written under a final name:

- `check_destination` runs before any work. It refuses (exit 2) a destination that is one of the command's sources,
  lies inside one or holds one, and an existing file or non-empty folder that is not this command's own earlier
  output, unless the user asked to overwrite.
- `new_folder` and `new_file` hand the caller a temporary sibling of the destination (same file system) to write
  into. When the block ends, every file and folder is fsynced and the sibling is renamed into place: a folder is
  always its complete old state or its complete new state. Replacing an existing folder swaps the two with
  `renameat2(RENAME_EXCHANGE)` where the kernel offers it, else moves the old one aside first. When the block
  fails, the sibling is removed and the destination is untouched.
- `remove` deletes a file or a folder by renaming it aside first, so a crash mid-delete never leaves a partial
  folder under its own name.
- A full disk, a read-only file system or a missing permission becomes `WriteFailed`: one line naming the path and
  the cause (exit 1).

- `replace_files` swaps a set of files inside a folder that holds other things too (a run folder's final model beside
  its checkpoints): they are staged in a temporary subfolder and moved in under `PENDING_RECORD`, which is removed
  last. A swap cut short leaves the record behind, so the folder is detectably incomplete (`check_complete`)
  rather than silently mixed.

Folder outputs carry `OUTPUT_RECORD`, naming the command that wrote them: the same command may write there again
without `--overwrite`; anything else may not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hf_sft.errors import UsageError, WriteFailed

OUTPUT_RECORD = ".hf_sft_output.json"
PENDING_RECORD = ".hf_sft-incomplete.json"
# The errors a user can act on; anything else is a bug and keeps its traceback under --debug.
_USER_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TEMP_TAG = ".hf_sft-tmp-"
_TRASH_TAG = ".hf_sft-old-"
_DISK_FULL = "_hf_sft_disk_full"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_destination(
    dest: str | Path,
    *,
    kind: str,
    command: str,
    sources: Iterable[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse, before any work, a destination that this command may not write; reads only.

    Args:
        dest: the file or folder the command will write.
        kind: "file" or "folder".
        command: what writes it, as recorded in a folder's `OUTPUT_RECORD` (e.g. "export --to llama").
        sources: paths the command reads: the destination may not be one of them, lie inside one or hold one.
        overwrite: the user asked to replace what is there.
        flag: the option that named `dest`, for the messages.

    Returns:
        `dest` as a `Path`.

    Raises:
        UsageError: the destination is a source or overlaps one, is of the other kind, is another command's (or
            another program's) output and `overwrite` is false, or its parent cannot be written.
    """
    dest = Path(dest)
    target = dest.resolve()
    for source in sources:
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise UsageError(f"{flag} {dest} is {'the input' if target == source else 'inside the input'} {source}")
        if target in source.parents:
            raise UsageError(f"{flag} {dest} holds the input {source}: choose another destination")
    hint = "choose another path, or pass --overwrite to replace it"
    if kind == "file":
        if dest.is_dir():
            raise UsageError(f"{flag} {dest} is a folder; this command writes a file")
        if dest.exists() and not overwrite:
            raise UsageError(f"{flag} {dest} already exists: {hint}")
    elif kind == "folder":
        if dest.exists() and not dest.is_dir():
            raise UsageError(f"{flag} {dest} exists and is not a folder")
        if dest.is_dir() and any(dest.iterdir()) and not overwrite and written_by(dest) != command:
            owner = written_by(dest)
            what = f"the output of `hf-sft {owner}`" if owner else "files this command did not write"
            raise UsageError(f"{flag} {dest} is not empty (it holds {what}): {hint}")
    else:
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    parent = _existing_parent(target)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {dest}: cannot write in {parent} (permission denied)")
    return dest


def written_by(folder: str | Path) -> str | None:
    """The command recorded in `folder`'s `OUTPUT_RECORD`, or None."""
    try:
        return json.loads((Path(folder) / OUTPUT_RECORD).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def new_folder(dest: str | Path, *, command: str | None = None, temp: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest` to fill; on success it becomes `dest`, replacing what was there.

    Args:
        dest: the folder to write.
        command: recorded in the folder's `OUTPUT_RECORD` (None: no record).
        temp: the temporary folder to use (on the file system of `dest`, e.g. inside `shared_temp(dest)`; it is
            created if missing), for writers whose several processes must agree on it; by default a fresh unique
            sibling.

    Raises:
        WriteFailed: the disk is full, the file system read-only, or a permission missing (nothing is left behind).
    """
    dest = Path(dest)
    staging = Path(temp) if temp is not None else _temp_sibling(dest)
    with _translated(dest, staging):
        staging.mkdir(parents=True, exist_ok=temp is not None)
        try:
            yield staging
            if command is not None:
                _write_record(staging, command)
            commit_folder(staging, dest)
        except BaseException as err:
            _note_disk_full(err, staging)
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextlib.contextmanager
def new_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path of `dest` to write; on success it is fsynced and renamed onto `dest`.

    Raises:
        WriteFailed: as `new_folder` (nothing is left behind).
    """
    dest = Path(dest)
    staging = _temp_sibling(dest)
    with _translated(dest, staging):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield staging
            _fsync_path(staging)
            os.replace(staging, dest)
            _fsync_path(dest.parent)
        except BaseException as err:
            _note_disk_full(err, staging)
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            raise


@contextlib.contextmanager
def replace_files(folder: str | Path, *, replaces: Iterable[str], note: str) -> Iterator[Path]:
    """Yield an empty temporary subfolder of `folder` to fill with files; on success they replace their namesakes.

    The files written (top level only) and those named in `replaces` that the new set lacks make up the change:
    `PENDING_RECORD` (holding `note`) is written first, the old files are removed and the new ones moved in one by
    one, and the record is removed last. When the block fails nothing in `folder` changes; when the swap itself is
    cut short (the process killed), the record stays and `check_complete` refuses the folder with `note`.

    Args:
        folder: the folder that receives the files (created if missing).
        replaces: the names of the files the new set replaces as a whole (a name not written is removed).
        note: what to do when the swap did not finish, e.g. the command that writes the files again.

    Raises:
        WriteFailed: as `new_folder` (the staged files are removed).
    """
    folder = Path(folder)
    staging = _temp_sibling(folder / "files")
    with _translated(folder, staging):
        staging.mkdir(parents=True)
        try:
            yield staging
            names = sorted(p.name for p in staging.iterdir())
            if any((staging / name).is_dir() for name in names):
                raise ValueError(f"replace_files moves files only, got folders in {staging}")
            for name in names:
                _fsync_path(staging / name)
            write_json(folder / PENDING_RECORD, {"note": note, "files": names})
        except BaseException as err:
            _note_disk_full(err, staging)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for name in sorted(set(replaces) - set(names) - {PENDING_RECORD}):
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for name in names:
            os.replace(staging / name, folder / name)
        _fsync_path(folder)
        (folder / PENDING_RECORD).unlink()
        _fsync_path(folder)
        staging.rmdir()


def incomplete(folder: str | Path) -> str | None:
    """The note of a `replace_files` swap in `folder` that did not finish, or None."""
    path = Path(folder) / PENDING_RECORD
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["note"])
    except (OSError, ValueError, KeyError, TypeError):
        return "an interrupted write left it incomplete"


def check_complete(folder: str | Path) -> None:
    """Refuse a folder whose last `replace_files` swap did not finish.

    Raises:
        UsageError: "{folder} is incomplete: {the swap's note}".
    """
    note = incomplete(folder)
    if note is not None:
        raise UsageError(f"{folder} is incomplete: {note}")


def write_text(dest: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `dest` through `new_file`."""
    with new_file(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | Path, value: Any) -> None:
    """Write `value` as indented JSON (with a final newline) to `dest` through `new_file`."""
    write_text(dest, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def remove(path: str | Path) -> None:
    """Delete a file or folder: renamed aside first, so no partial folder is ever left under its own name."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    with _translated(path, None):
        if path.is_dir() and not path.is_symlink():
            trash = path.with_name(f"{_TRASH_TAG}{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            _fsync_path(path.parent)
            shutil.rmtree(trash)
        else:
            path.unlink()


def commit_folder(staging: str | Path, dest: str | Path) -> None:
    """fsync everything in `staging`, then make it `dest` (replacing an existing `dest` whole)."""
    staging, dest = Path(staging), Path(dest)
    with _translated(dest, None):
        for root, dirs, files in os.walk(staging):
            for name in files:
                _fsync_path(Path(root) / name)
            for name in dirs:
                _fsync_path(Path(root) / name)
        _fsync_path(staging)
        if not dest.exists():
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            shutil.rmtree(staging)  # the old folder, now under the temporary name
        else:
            trash = dest.with_name(f"{_TRASH_TAG}{dest.name}-{uuid.uuid4().hex[:8]}")
            os.rename(dest, trash)
            os.rename(staging, dest)
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_path(dest.parent)


def leftovers(folder: str | Path) -> list[Path]:
    """Temporary and aside-moved entries this module left in `folder` (a process killed mid-write leaves them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith((_TEMP_TAG, _TRASH_TAG)))


def shared_temp(dest: str | Path) -> Path:
    """The temporary sibling of `dest` that every process of a run computes alike (`new_folder`'s `temp`)."""
    dest = Path(dest)
    return dest.with_name(f"{_TEMP_TAG}{dest.name}")


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is one of this module's temporary or aside-moved names."""
    return Path(path).name.startswith((_TEMP_TAG, _TRASH_TAG))


def user_error(err: BaseException) -> str | None:
    """The cause a user can act on (e.g. "no space left on device") if `err` is one, else None."""
    if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
        return _USER_ERRNOS[err.errno]
    return None


@contextlib.contextmanager
def _translated(dest: Path, staging: Path | None) -> Iterator[None]:
    """Turn the errors a user can act on into `WriteFailed`; a disk that filled up mid-write counts too.

    torch's serializer reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`,
    so any failure is checked against the free space that is left.
    """
    try:
        yield
    except WriteFailed:
        raise
    except OSError as err:
        cause = user_error(err)
        if cause is None:
            raise
        raise WriteFailed(f"cannot write {dest}: {cause}") from err
    except Exception as err:
        full = getattr(err, _DISK_FULL, None)
        if not (_disk_full(staging or dest) if full is None else full):
            raise
        raise WriteFailed(f"cannot write {dest}: no space left on device") from err


def _note_disk_full(err: BaseException, staging: Path) -> None:
    """Whether the disk was full, judged before the staged files are removed (which frees their space)."""
    if isinstance(err, Exception) and not isinstance(err, OSError | WriteFailed):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(err, _DISK_FULL, _disk_full(staging))


def _disk_full(path: Path) -> bool:
    try:
        stats = os.statvfs(_existing_parent(path))
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def _write_record(folder: Path, command: str) -> None:
    from hf_sft import __version__

    record = {"command": command, "hf_sft_version": __version__}
    (folder / OUTPUT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _temp_sibling(dest: Path) -> Path:
    return dest.with_name(f"{_TEMP_TAG}{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
