"""Writing files without losing one: destination checks before the work, and atomic replacement.

Every file minisd writes (images, checkpoints, a diffusers folder's JSON and tokenizer files)
goes through `atomic_write`:

1. the data is written to a fresh temporary name in the destination's folder
   (`.minisd-<random>.tmp`, created with `O_EXCL`, so it never is a user's file);
2. it is flushed to the disk (`fsync`) and given the mode the destination would get;
3. it takes the destination's name in one step: `os.replace` with `overwrite=True`,
   otherwise a hard link, which fails rather than replace a file created in the meantime.

So a full disk, an exception or Ctrl-C leaves the old file whole and no temporary file
behind (a SIGKILL can leave a `.minisd-*.tmp`, never a half-written destination). This is
the pattern of `atomicwrites` and of git's lock files.

`check_destination` and `check_source` are the checks the CLI runs before any work: a
missing folder, a folder given as a file name, an existing file, an unwritable folder or
a FIFO is reported in one line before a model is loaded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

_PREFIX, _SUFFIX = ".minisd-", ".tmp"


def _exists_message(path: Path) -> str:
    return f"{path} exists (pass overwrite=True, or --overwrite, to replace it)"


def _writable(folder: Path) -> bool:
    # the effective uid decides what the kernel allows; access(2) alone checks the real one
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=effective)


def check_destination(path: str | Path, *, overwrite: bool, folder: bool = False) -> Path:
    """Check that `path` can be written, before any work is done; return it as a `Path`.

    Its parent must be an existing, writable folder. A file destination must not be a folder,
    nor a FIFO, device or socket; a folder destination (`folder=True`) must not be a file. An
    existing file, or a folder that is not empty, is an error unless `overwrite` is true.
    Raises `FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`, `FileExistsError`,
    `PermissionError` or `OSError`, each naming the path."""
    path = Path(path)
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"{path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is not a folder")
    if folder:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; a diffusers model is written as a folder")
        if path.is_dir() and not overwrite and any(path.iterdir()):
            raise FileExistsError(_exists_message(path))
    else:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name")
        if path.exists() and not path.is_file():
            raise OSError(f"{path} is not a regular file (a FIFO, device or socket); minisd writes only regular files")
        if path.exists() and not overwrite:
            raise FileExistsError(_exists_message(path))
    if not _writable(parent):
        raise PermissionError(f"{path}: the folder {parent} is not writable")
    return path


def check_source(path: str | Path) -> Path:
    """Check that `path` is an existing, readable regular file or folder; return it as a `Path`.

    A FIFO or a device would block or never end a read: it is refused before it is opened."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        raise OSError(f"{path} is not a regular file or a folder (a FIFO, device or socket)")
    effective = os.access in os.supports_effective_ids
    if not os.access(path, os.R_OK, effective_ids=effective):
        raise PermissionError(f"{path}: permission denied (not readable)")
    return path


def _temporary_name(folder: Path) -> Path:
    """A fresh name in `folder` for a temporary file or folder (64 random bits: a clash is ~2**-64)."""
    return folder / f"{_PREFIX}{secrets.token_hex(8)}{_SUFFIX}"


def _create_exclusive(tmp: Path) -> int:
    """Create the empty file `tmp`, never an existing one (O_EXCL); its mode (0o666 less the umask)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _is_temporary(filename: object) -> bool:
    name = os.path.basename(filename) if isinstance(filename, str) else ""
    return name.startswith(_PREFIX) and name.endswith(_SUFFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    # makes the rename itself durable; not every platform or filesystem can open a folder
    with contextlib.suppress(OSError):
        _fsync(folder)


def _publish(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Give the complete file `tmp` the name `path`, in one step."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists, even if it appeared after the check
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    except OSError:  # a filesystem without hard links (FAT, some network mounts)
        if os.path.lexists(path):
            raise FileExistsError(_exists_message(path)) from None
        os.replace(tmp, path)


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write a file so that `path` holds either its old content or the whole new one, never a part.

    `write(tmp)` writes the content to the temporary path it is given (a name ending in `.tmp`:
    pass a format explicitly where a writer guesses it from the extension). A symlink at
    `path` is followed: its target is replaced. Returns `path` as a `Path`.

    Raises `FileExistsError` if `path` exists and `overwrite` is false, and whatever `write`
    raises; in every case the temporary file is removed and an existing `path` is untouched."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    check_destination(path, overwrite=overwrite)
    tmp: Path | None = None
    try:
        # The name is recorded before the file exists, so a Ctrl-C at any point from here on (signals
        # arrive between any two bytecodes) finds it in `finally` and removes it.
        while tmp is None:
            tmp = _temporary_name(path.parent)
            try:
                mode = _create_exclusive(tmp)
            except FileExistsError:  # somebody else's file: not ours to remove
                tmp = None
        if path.exists():
            mode = stat.S_IMODE(path.stat().st_mode)  # a replaced file keeps its permissions
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0o600 one
        _fsync(tmp)
        _publish(tmp, path, overwrite=overwrite)
    except OSError as e:
        if e.errno is not None and (e.filename is None or _is_temporary(e.filename)):
            e.filename = str(path)  # name the user's file, not the temporary one
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool) -> Path:
    """`atomic_write` for a UTF-8 text file (whatever the locale's encoding)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """A folder to write into: a new one appears at `path` only when the block completes.

    If `path` does not exist, the block fills a temporary folder next to it, renamed to `path`
    at the end and removed, with all it holds, if the block raises. If `path` is an existing
    folder (empty, or `overwrite=True`), the block writes into it; each file should then go
    through `atomic_write`, so that every file is whole, and the files minisd does not write
    are kept. The checks of `check_destination(folder=True)` come first."""
    path = check_destination(path, overwrite=overwrite, folder=True)
    if path.is_dir():
        yield path
        return
    tmp: Path | None = None
    try:
        while tmp is None:  # named before it exists, as in `atomic_write`, so an interrupt leaves nothing
            tmp = _temporary_name(path.parent)
            try:
                tmp.mkdir()  # the umask applies, as to any new folder
            except FileExistsError:  # somebody else's: not ours to remove
                tmp = None
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # all of it was written by the block
        raise
    _fsync_folder(path.parent)
