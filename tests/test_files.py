"""Writing files (`minisd.files`): destination checks, and atomic writes that never lose a file.

The failures are simulated where they happen: a writer that dies half-way with ENOSPC (a full
disk) or KeyboardInterrupt, a file that appears while another is written, a temporary name
already taken, and a folder the kernel refuses to write into (as root, by dropping to
`nobody`, since root ignores permission bits).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import minisd
from minisd import checkpoint, cli, files


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_full_disk(tmp: Path) -> None:
    """A writer that gets half-way, then finds the disk full."""
    tmp.write_bytes(b"half of the new")
    raise enospc()


# ------------------------------------------------------------------------------ permissions, as the kernel decides
@contextlib.contextmanager
def reachable_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder that the unprivileged user of `kernel_permissions` can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="minisd-test-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@contextlib.contextmanager
def kernel_permissions() -> Iterator[None]:
    """Permission bits apply in the block: as root (which ignores them), the block runs with the
    effective uid of `nobody`; seteuid is undone at the end. Otherwise nothing changes."""
    if os.geteuid() != 0:
        yield
        return
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        nobody = 65534
    os.seteuid(nobody)
    try:
        yield
    finally:
        os.seteuid(0)


@contextlib.contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder, holding `old.png`, that the process may not write into (permission bits, no mock)."""
    with reachable_folder(tmp_path) as base:
        folder = base / "read-only"
        folder.mkdir()
        (folder / "old.png").write_bytes(b"old")
        folder.chmod(0o555)
        try:
            with kernel_permissions():
                yield folder
        finally:
            folder.chmod(0o755)


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO that cannot hang the test: if the code under test opens it for reading after all,
    a writer thread opens and closes the other end, so the read ends (with no data) instead of blocking."""
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        if writer.is_alive():  # nothing opened it: open the reading end ourselves to release the writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(5)
            os.close(fd)


# ------------------------------------------------------------------------------ atomic_write
def test_write_then_replace_keeps_the_mode(tmp_path):
    out = tmp_path / "out.png"
    assert files.atomic_write(out, lambda tmp: tmp.write_bytes(b"first"), overwrite=False) == out
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_bytes() == b"first" and stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    files.atomic_write(out, lambda tmp: tmp.write_bytes(b"second"), overwrite=True)
    assert out.read_bytes() == b"second" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert listing(tmp_path) == ["out.png"]


@pytest.mark.reliability(
    "writing files",
    "a full disk (ENOSPC) half-way through replacing a file",
    "the `OSError` names the user's file (not the temporary one); the old file is intact and no temporary file is left",
)
def test_full_disk_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the user's image")
    with pytest.raises(OSError) as info:
        files.atomic_write(out, half_then_full_disk, overwrite=True)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)  # names the user's file
    assert out.read_bytes() == b"the user's image"
    assert listing(tmp_path) == ["out.png"]  # no temporary file left


@pytest.mark.reliability(
    "writing files",
    "Ctrl-C (`KeyboardInterrupt`) or any exception half-way through a write",
    "the destination is untouched and the temporary file is removed",
)
def test_interrupt_leaves_nothing(tmp_path):
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "out.png", interrupted, overwrite=False)
    assert listing(tmp_path) == []


@pytest.mark.reliability(
    "writing files",
    "an existing destination without `overwrite`",
    "`FileExistsError` (`pass overwrite=True, or --overwrite`) before anything is written",
)
def test_existing_file_is_refused_before_writing(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"mine")
    calls = []
    with pytest.raises(FileExistsError, match="--overwrite"):
        files.atomic_write(out, calls.append, overwrite=False)
    assert calls == [] and out.read_bytes() == b"mine"


@pytest.mark.reliability(
    "writing files",
    "a file created at the destination by another program while minisd writes, without `overwrite`",
    "`FileExistsError`; the other program's file is kept (the new file is published by a hard link, which "
    "never replaces)",
)
def test_file_created_during_the_write_is_not_clobbered(tmp_path):
    out = tmp_path / "out.png"

    def meanwhile(tmp: Path) -> None:  # another program creates `out` while we write
        out.write_bytes(b"theirs")
        tmp.write_bytes(b"ours")

    with pytest.raises(FileExistsError):
        files.atomic_write(out, meanwhile, overwrite=False)
    assert out.read_bytes() == b"theirs" and listing(tmp_path) == ["out.png"]


@pytest.mark.reliability(
    "writing files",
    "a user's file that has the temporary name (`.minisd-<random>.tmp`; the old code used and deleted `NAME.partial`)",
    "never opened, replaced or deleted: temporary files are created with `O_EXCL` under a fresh random name",
)
def test_a_taken_temporary_name_is_never_used(tmp_path, monkeypatch):
    taken = tmp_path / ".minisd-0000000000000000.tmp"
    taken.write_bytes(b"a user's file")
    tokens = iter(["0000000000000000", "1111111111111111"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    files.atomic_write(tmp_path / "out.png", lambda tmp: tmp.write_bytes(b"new"), overwrite=False)
    assert taken.read_bytes() == b"a user's file" and (tmp_path / "out.png").read_bytes() == b"new"
    assert listing(tmp_path) == [".minisd-0000000000000000.tmp", "out.png"]


@pytest.mark.reliability(
    "writing files",
    "a symlink as the destination, with `overwrite`",
    "the link is kept and its target replaced, atomically",
)
def test_symlink_target_is_replaced(tmp_path):
    target, link = tmp_path / "real.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    link.symlink_to(target)
    files.atomic_write(link, lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
    assert link.is_symlink() and target.read_bytes() == b"new"


# ------------------------------------------------------------------------------ check_destination / check_source
@pytest.mark.reliability(
    "writing files",
    "a destination whose folder is missing, that lies under a file, that is a folder or a FIFO; a "
    "diffusers destination that is a file or a non-empty folder",
    "`FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`, `OSError` or `FileExistsError` "
    "naming the path, before any work",
)
def test_destination_errors(tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "x").write_bytes(b"")
    os.mkfifo(tmp_path / "a-fifo")
    cases = [
        (tmp_path / "missing" / "out.png", {}, FileNotFoundError, "does not exist"),
        (tmp_path / "a-file" / "out.png", {}, NotADirectoryError, "is not a folder"),  # a path under a file
        (tmp_path / "a-folder", {}, IsADirectoryError, "is a folder"),
        (tmp_path / "a-fifo", {"overwrite": True}, OSError, "not a regular file"),
        (tmp_path / "a-file", {"folder": True}, NotADirectoryError, "is a file"),
        (tmp_path / "a-folder", {"folder": True}, FileExistsError, "exists"),  # not empty
    ]
    for path, kw, error, match in cases:
        with pytest.raises(error, match=match):
            files.check_destination(path, **{"overwrite": False, **kw})
    assert files.check_destination(tmp_path / "a-folder", overwrite=True, folder=True) == tmp_path / "a-folder"
    (tmp_path / "empty").mkdir()
    assert files.check_destination(tmp_path / "empty", overwrite=False, folder=True) == tmp_path / "empty"


@pytest.mark.reliability(
    "writing files",
    "a folder without write permission (enforced as the kernel does, also as root)",
    "`PermissionError` (`the folder ... is not writable`) before any work; if the kernel refuses later, "
    "the error names the user's file and nothing is left behind",
)
def test_unwritable_folder(tmp_path, monkeypatch):
    with read_only_folder(tmp_path) as folder:
        with pytest.raises(PermissionError, match="not writable"):
            files.check_destination(folder / "new.png", overwrite=False)
        # and if the check is skipped, the kernel's refusal names the user's file and leaves nothing
        monkeypatch.setattr(files, "check_destination", lambda path, **kw: path)
        with pytest.raises(PermissionError) as info:
            files.atomic_write(folder / "old.png", lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
        assert info.value.filename == str(folder / "old.png")
        assert listing(folder) == ["old.png"] and (folder / "old.png").read_bytes() == b"old"


@pytest.mark.reliability(
    "writing files",
    "a source that is missing, unreadable (permission denied) or a FIFO",
    "`FileNotFoundError`, `PermissionError` or `OSError` before it is opened (a FIFO never blocks a read)",
)
def test_source_errors(tmp_path):
    os.mkfifo(tmp_path / "a-fifo")
    with pytest.raises(FileNotFoundError, match="no such file"):
        files.check_source(tmp_path / "missing.safetensors")
    with pytest.raises(OSError, match="not a regular file"):
        files.check_source(tmp_path / "a-fifo")  # refused before it is opened: no blocked read
    with reachable_folder(tmp_path) as base:
        secret = base / "secret.safetensors"
        secret.write_bytes(b"")
        secret.chmod(0o000)
        with kernel_permissions(), pytest.raises(PermissionError, match="not readable"):
            files.check_source(secret)


# ------------------------------------------------------------------------------ checkpoint.save
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = cli.demo_model(tmp_path_factory.mktemp("demo"))
    return minisd.load(path, config=path.with_suffix(".json"))


def failing_save_file(after: int):
    """safetensors' save_file, failing on call number `after` (0-based) as it does on a full disk."""
    calls = []
    real = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > after:
            Path(filename).write_bytes(b"half a checkpoint")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, filename, metadata=metadata)

    return save_file


@pytest.mark.reliability(
    "writing files",
    "a full disk while `save` replaces a checkpoint, with the user's own `out.safetensors.partial` beside it",
    "`OSError` naming the file; the old checkpoint loads unchanged, the user's file is kept, and the new "
    "file gets the usual mode (not safetensors' 0600)",
)
def test_save_on_a_full_disk_keeps_the_checkpoint_and_the_users_files(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    minisd.save(tiny_model, out)
    before = safetensors.torch.load_file(str(out))
    partial = tmp_path / "out.safetensors.partial"  # the user's own file, with the name the old code used
    partial.write_bytes(b"the user's")
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file(after=0))
    with pytest.raises(OSError, match="out.safetensors: could not write the file.*No space left"):
        minisd.save(tiny_model, out, overwrite=True)
    after = safetensors.torch.load_file(str(out))
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert listing(tmp_path) == ["out.safetensors", "out.safetensors.partial"]
    monkeypatch.undo()
    minisd.save(tiny_model, out, overwrite=True)
    assert partial.read_bytes() == b"the user's" and listing(tmp_path) == ["out.safetensors", "out.safetensors.partial"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not safetensors' own 0o600


@pytest.mark.reliability(
    "writing files",
    "a failure half-way through writing a new diffusers folder; a save into a folder holding the user's own files",
    "no folder and no temporary folder is left; in an existing folder, files minisd does not write are kept",
)
def test_diffusers_folder_appears_only_when_complete(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file(after=1))  # the U-Net is written, the VAE fails
    with pytest.raises(OSError, match="No space left"):
        minisd.save(tiny_model, tmp_path / "export", format="diffusers")
    assert listing(tmp_path) == []  # no half folder, no temporary folder
    monkeypatch.undo()
    # into an existing folder: every file minisd writes is replaced, the user's own are kept
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "README.md").write_text("mine")
    minisd.save(tiny_model, tmp_path / "export", format="diffusers", overwrite=True)
    assert (tmp_path / "export" / "README.md").read_text() == "mine"
    assert "model_index.json" in listing(tmp_path / "export") and listing(tmp_path) == ["export"]
    assert not [p for p in (tmp_path / "export").rglob(".minisd-*")]
    minisd.load(tmp_path / "export")


@pytest.mark.reliability(
    "files written", "Ctrl-C the instant after the temporary file or folder is created (before any write)",
    "`KeyboardInterrupt`, and no temporary file or folder is left behind",
)
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_interrupt_right_after_the_temporary_is_created_leaves_nothing(kind, tmp_path, monkeypatch):
    """A signal arrives between any two bytecodes: here just after the temporary exists (in the fstat
    after the O_EXCL open, or the first step of the block), before the code holding its name returns."""
    if kind == "file":
        def fstat(fd):
            raise KeyboardInterrupt

        monkeypatch.setattr(files.os, "fstat", fstat)
        with pytest.raises(KeyboardInterrupt):
            files.atomic_write(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"x"), overwrite=False)
    else:
        with pytest.raises(KeyboardInterrupt), files.atomic_folder(tmp_path / "model", overwrite=False):
            raise KeyboardInterrupt
    assert listing(tmp_path) == []
