"""The one module that writes hf_sft's outputs: destinations checked first, temporary siblings, fsync, rename.

Callers say what to write; this module says how, so that nothing is ever left half-written under a final name:

- `check_destination` is the one rule for where a command may write; every command declares its sources and each
  destination to it before any work (`check_cache` for caches). It refuses (exit 2, one line) a destination that is
  one of the command's sources, lies inside one or holds one, whatever the flags and without naming one; a
  destination that cannot exist (under a regular file, on a read-only file system, in a folder that may not be
  written), in the system's words; a run folder for a saved dataset and the reverse, even with overwrite; and an
  existing file or non-empty folder that is not this command's own earlier output (a folder's `OUTPUT_RECORD`, a
  file's first bytes), unless the user asked to overwrite.
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
without `--overwrite`; anything else may not. Temporary names carry the writer's pid, so that the next write to the
same destination removes what a killed writer left (`remove_stale_siblings`) and leaves a live one's alone.
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

# "_": Trainer's pushes of a run folder to the Hub leave `_*` out, as they do the run's lock.
OUTPUT_RECORD = "_hf_sft_output.json"
_OLDER_RECORD = ".hf_sft_output.json"  # its name in folders written by earlier versions, still read
PENDING_RECORD = ".hf_sft-incomplete.json"
# The errors a user can act on; anything else is a bug and keeps its traceback under --debug.
_USER_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# A run folder and a saved dataset each hold work the other would destroy (checkpoints, tokenised splits): neither
# command ever writes into the other's output, even with its overwrite flag; nor does an evaluation's report go into
# a saved dataset (whose folder `datasets` reads whole).
RUN_FOLDER = "train"
SAVED_DATASET = "data --save_to"
_NEVER_INTO = {(RUN_FOLDER, SAVED_DATASET), (SAVED_DATASET, RUN_FOLDER), (SAVED_DATASET, "eval")}
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
    overwrite_flag: str | None = "--overwrite",
    marker: bytes | None = None,
    keeps: Iterable[str] = (),
    continuing: bool = False,
) -> Path:
    """Refuse, before any work, a destination that this command may not write; reads only.

    The one rule every command's destinations go through (the module docstring says it in words), in this order: a
    destination that is a source, lies inside one or holds one is refused even with `overwrite`; one that cannot
    exist (under a regular file, on a read-only file system, in a folder this user cannot write) is named with the
    system's own words; a run is never written into a saved dataset nor the reverse (`_NEVER_INTO`), even with
    `overwrite`; anything else that is not this command's own earlier output is refused without `overwrite`.

    Args:
        dest: the file or folder the command will write.
        kind: "file" (replaced whole), "folder" (replaced whole, or a run folder written in place) or "files" (the
            command adds files of its own into a folder that holds other things, as `hf-sft eval` does).
        command: what writes it, as recorded in a folder's `OUTPUT_RECORD` (e.g. "export --to llama").
        sources: paths the command reads: the destination may not be one of them, lie inside one or hold one.
        overwrite: the user asked to replace what is there.
        flag: the option that named `dest`, for the messages.
        overwrite_flag: the option that sets `overwrite`, named in the refusals (None: the command has none).
        marker: how an earlier output file of this command begins (kind "file"): such a file is rewritten without
            `overwrite`. None: every existing file needs `overwrite`.
        keeps: names in a folder that do not make it someone else's (a run's lock and log).
        continuing: the command continues the work already in `dest` (a resumed run): an unmarked folder is taken
            as its own.

    Returns:
        `dest` as a `Path`.

    Raises:
        UsageError: see above; one line, that never names a flag that would destroy an input.
    """
    if kind not in ("file", "folder", "files"):
        raise ValueError(f"kind must be 'file', 'folder' or 'files', got {kind!r}")
    dest = Path(dest)
    target = Path(os.path.abspath(dest))
    _check_overlap(dest, sources, flag)
    _check_writable(target, f"{flag} {dest}", inside=kind != "file")
    hint = "choose another path" + (f", or pass {overwrite_flag} to replace it" if overwrite_flag else "")
    if kind == "file":
        if dest.is_dir():
            raise UsageError(f"{flag} {dest} is a folder; this command writes a file")
        if dest.exists() and not overwrite and not (marker is not None and _starts_with(dest, marker)):
            raise UsageError(f"{flag} {dest} already exists: {hint}")
        return dest
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{flag} {dest} exists and is not a folder")
    owner = written_by(dest)
    if (owner, command) in _NEVER_INTO:
        raise UsageError(
            f"{flag} {dest} holds the output of `hf-sft {owner}`, which `hf-sft {command}` never writes into: "
            "choose another path"
        )
    if overwrite or owner == command or (continuing and owner is None) or not dest.is_dir():
        return dest
    if kind == "files":
        return dest  # its own files are checked by the command, which knows their names
    ignored = {OUTPUT_RECORD, _OLDER_RECORD, *keeps}
    if any(p.name not in ignored and not is_temporary(p) for p in dest.iterdir()):
        what = f"the output of `hf-sft {owner}`" if owner else "files this command did not write"
        raise UsageError(f"{flag} {dest} is not empty (it holds {what}): {hint}")
    return dest


def check_cache(folder: str | Path, what: str, sources: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work, a cache folder that cannot be created or written (e.g. under a `HOME` that is a file),
    or that is an input or lies inside one (a folder of data shards would read the cache's files as data).

    A cache only adds files under names of its own, so any other folder will do, one that holds the data included.

    Args:
        folder: the cache folder (it need not exist yet).
        what: how the message names it, e.g. "the datasets cache".
        sources: the paths the command reads.

    Raises:
        UsageError: one line naming the folder at fault and the system's cause.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder}: cannot create it: {os.strerror(errno.ENOTDIR).lower()}")
    _check_overlap(folder, sources, what, holding=False)
    _check_writable(folder, f"{what} {folder}", inside=True)
    return folder


def cannot_write(path: str | Path, *, inside: bool = False) -> tuple[Path, int] | None:
    """Why `path` could not be created (or replaced), before trying: `(the folder at fault, errno)`, or None.

    The nearest existing ancestor must be a folder (else ENOTDIR) that this process may write (`writable_error`);
    with `inside`, an existing `path` that is a folder must be writable too (the command writes into it).
    """
    path = Path(os.path.abspath(path))
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return ancestor, errno.ENOTDIR
    for folder in (ancestor, path) if inside and path.is_dir() else (ancestor,):
        code = writable_error(folder)
        if code is not None:
            return folder, code
    return None


def writable_error(folder: Path) -> int | None:
    """The errno that creating an entry in the existing `folder` would meet (EROFS, EACCES), or None.

    The one place that probes writability: it reads only (a read-only mount is seen in its flags), so a refused
    command leaves no trace.
    """
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError as err:
        return err.errno
    if not os.access(folder, os.W_OK | os.X_OK):
        return errno.EACCES
    return None


def _check_writable(path: Path, named: str, inside: bool) -> None:
    """Refuse a path that `cannot_write` finds blocked, naming the cause as the system does (`os.strerror`)."""
    blocked = cannot_write(path, inside=inside)
    if blocked is not None:
        where, code = blocked
        verb = "cannot create it under" if code == errno.ENOTDIR else "cannot write in"
        raise UsageError(f"{named}: {verb} {where}: {os.strerror(code).lower()}")


def _check_overlap(dest: Path, sources: Iterable[str | Path], flag: str, holding: bool = True) -> None:
    """Refuse a destination that is a source, lies inside one or (`holding`) holds one; the message names no flag to
    force it."""
    target = dest.resolve()
    for source in sources:
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise UsageError(f"{flag} {dest} is {'the input' if target == source else 'inside the input'} {source}")
        if holding and target in source.parents:
            raise UsageError(f"{flag} {dest} holds the input {source}: choose another destination")


def _starts_with(path: Path, marker: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(marker)) == marker
    except OSError:
        return False


def written_by(folder: str | Path) -> str | None:
    """The command recorded in `folder`'s `OUTPUT_RECORD`, or None."""
    for name in (OUTPUT_RECORD, _OLDER_RECORD):
        try:
            return json.loads((Path(folder) / name).read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            continue
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
        remove_stale_siblings(dest)
        staging.mkdir(parents=True, exist_ok=temp is not None)
        try:
            yield staging
            if command is not None:
                _write_record(staging / OUTPUT_RECORD, command)
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
    with new_files(dest) as (staging,):
        yield staging


@contextlib.contextmanager
def new_files(*dests: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield a temporary sibling path for each of `dests`; once all are written, they are renamed in, in order.

    For files that belong together (a GGUF and its Modelfile): each stays under its temporary name until every one
    is written, and the one named last (the one the others describe) appears last, so it is never seen without them.

    Raises:
        WriteFailed: as `new_folder` (nothing is left behind).
    """
    dests = tuple(Path(dest) for dest in dests)
    stagings = tuple(_temp_sibling(dest) for dest in dests)
    with _translated(dests[0], stagings[0]):
        for dest in dests:
            remove_stale_siblings(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield stagings
            for staging in stagings:
                _fsync_path(staging)
            for staging, dest in zip(stagings, dests, strict=True):
                os.replace(staging, dest)
            for parent in {dest.parent for dest in dests}:
                _fsync_path(parent)
        except BaseException as err:
            _note_disk_full(err, stagings[0])
            for staging in stagings:
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
        remove_stale_siblings(folder / "files")
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
            trash = _temp_sibling(path, _TRASH_TAG)
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
            trash = _temp_sibling(dest, _TRASH_TAG)
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


def remove_stale_siblings(dest: str | Path) -> list[Path]:
    """Remove the temporary and aside-moved siblings of `dest` that a killed writer left (its pid is gone).

    Only names this module makes for `dest` (`<tag><name>-<pid>-<random>`) are touched, and only when no process with
    that pid is alive: a concurrent writer's staging is left alone. `new_file`, `new_folder` and `replace_files`
    call it first, so the next run of a command cleans up after a SIGKILL.

    Returns:
        What was removed.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for path in dest.parent.iterdir():
        for tag in (_TEMP_TAG, _TRASH_TAG):
            prefix = f"{tag}{dest.name}-"
            if not path.name.startswith(prefix):
                continue
            pid, _, rest = path.name[len(prefix) :].partition("-")
            if pid.isdigit() and len(rest) == 8 and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


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


def record_output(folder: str | Path, command: str) -> None:
    """Mark `folder`, written in place (a run folder), as `command`'s output: its `OUTPUT_RECORD`, written whole."""
    with new_file(Path(folder) / OUTPUT_RECORD) as staging:
        _write_record(staging, command)


def _write_record(path: Path, command: str) -> None:
    from hf_sft import __version__

    record = {"command": command, "hf_sft_version": __version__}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _temp_sibling(dest: Path, tag: str = _TEMP_TAG) -> Path:
    """`<tag><name>-<pid>-<random>`: the pid tells a later run whether its writer is still alive."""
    return dest.with_name(f"{tag}{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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
