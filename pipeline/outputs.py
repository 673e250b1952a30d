"""The output-folder contract every stage keeps: an output is replaced only if the project wrote
it (its marker), under a lock naming the writer's PID, written beside it and swapped in whole at
the end, so that a failed, refused or killed run leaves the previous output as it was; and the
sha256 that tells a written file whole (checkpoints, exported and registered models)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import FerError

#: Written into every output folder the project creates; a folder holding it may be replaced.
MARKER = ".fer-output.json"


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoints and exported models are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` with the process umask applied (mkdtemp/mkstemp create 0700/0600)."""
    old = os.umask(0)
    os.umask(old)
    return mode & ~old


@contextlib.contextmanager
def replacing_file(path: Path):
    """Yield a temporary path beside ``path`` to write the new file into; when the block ends it is
    renamed over ``path`` (with the user's normal file mode), and when it raises (or the process is
    killed) ``path`` keeps its previous bytes. DVC's ``persist: true`` outputs rely on this: DVC no
    longer deletes them before a stage runs, so a failed stage leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file_atomic(path: Path, data: bytes | str) -> Path:
    """``path`` holds ``data`` whole, or its previous bytes if the writer dies (:func:`replacing_file`)."""
    with replacing_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def check_replaceable(out: Path, *, what: str, legacy_names: frozenset[str] = frozenset(),
                      markers: tuple[str, ...] = (MARKER,)) -> None:
    """Refuse (FerError, nothing touched) unless ``out`` is missing, an empty folder, or a folder
    this project wrote: it holds one of ``markers``, or (outputs of versions before the marker)
    nothing but ``legacy_names``. Never delete a user's folder because it was named as OUT."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise FerError(f"{out} exists and is not a folder; choose another output path")
    try:
        names = {p.name for p in out.iterdir()}
    except OSError as e:
        raise FerError(f"cannot read {out}: {e.strerror or e}") from e
    if not names or any(m in names for m in markers) or (legacy_names and names <= legacy_names):
        return
    raise FerError(f"{out} is not empty and was not written by {what} (no {markers[0]} in it); "
                   "nothing was changed: choose an empty or new output folder")


def write_marker(folder: Path, what: str, **info) -> None:
    """The marker that lets a later run recognise (and replace) this output folder. Its content
    is a function of ``what`` and ``info`` only, so that the folder's DVC hash is reproducible."""
    (folder / MARKER).write_text(json.dumps({"written_by": what, **info}, sort_keys=True) + "\n")


@contextlib.contextmanager
def output_lock(out: Path, what: str = "the output"):
    """Hold an exclusive lock on output ``out`` for the block; a second run on the same output
    fails at once with a line naming the holder's PID. The lock is ``flock`` on ``.OUT.lock``
    beside OUT (holding the PID), so a killed run never leaves a stale lock; the file is removed
    on release, and a run that locked a file just removed by its holder tries again."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FerError(f"cannot write {what} at {out}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FerError(f"{out} is being written by another run (pid {holder}); wait for it "
                           "to finish, or choose another output") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def cleanup_stale(out: Path) -> None:
    """Tidy up after killed runs (whose pid is gone): remove ``.OUT.tmp-<pid>-*`` folders, and
    for ``.OUT.old-<pid>-*`` put the previous OUT back if the run died mid-swap, else remove."""
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        try:
            pid = int(p.name.split(".tmp-" if ".tmp-" in p.name else ".old-", 1)[1].split("-", 1)[0])
        except (ValueError, IndexError):
            continue
        if pid_alive(pid):
            continue  # still running
        if ".old-" in p.name and (p / "x").exists() and not out.exists():
            os.replace(p / "x", out)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def replacing(out: Path):
    """Yield a fresh folder beside ``out`` to write the new output into; when the block ends it
    replaces ``out`` whole, and when it raises (or the process is killed) ``out`` is untouched
    and the folder is removed (here, or by the next run's :func:`cleanup_stale`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, umask_mode())
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished folder ``tmp`` (two renames; the previous ``out`` is kept
    aside until the new one is in place)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
