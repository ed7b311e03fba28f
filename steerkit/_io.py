"""Files in and out, safely: outputs that never lose what they did not create, paths that stay in their folder.

Every writer in steerkit goes through ``atomic_path``: the output is built under a temporary sibling
(``.NAME.steerkit-tmp-PID-XXXX``) and renamed into place only when complete. An existing output is replaced
only with ``force=True``, and even then never when it is an input of the call, holds one, or is (or holds)
the working directory, the home directory or the filesystem root; a file never replaces a directory nor a
directory a file. With ``force`` the old output is set aside (``.NAME.steerkit-old-PID-XXXX``) and removed
only after the new one is in place, so a failure keeps it. Temporaries go on exceptions, Ctrl-C and SIGTERM;
one left by a SIGKILL is named the next time something is written beside it, and ``clean`` removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
PathLike = str | os.PathLike
TMP_TAG = ".steerkit-tmp-"
OLD_TAG = ".steerkit-old-"


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while steerkit writes, so temporaries are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# --- paths ------------------------------------------------------------------------------------------------


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both already absolute)."""
    return inner == outer or outer in inner.parents


def _protected() -> list[tuple[str, Path]]:
    return [
        ("the filesystem root", Path(Path.cwd().anchor or "/").resolve()),
        ("the home directory", Path.home().resolve()),
        ("the working directory", Path.cwd().resolve()),
    ]


def check_output(
    path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (), directory: bool = False
) -> Path:
    """Refuse an output path where writing could lose data; returns the path. Call it before the work starts.

    Refused always: an input of the call (or a folder holding one), the working directory, home or root
    (or a folder holding them), and a directory where a file goes (or the reverse). Refused without
    ``force``: anything that exists. Stale temporaries of this path from a killed run are reported.
    """
    final = Path(path).expanduser()
    if final.name in ("", ".", ".."):
        raise ValueError(f"output {str(path)!r} names no file or folder: give a name such as out/{final.name}x")
    targets = {Path(os.path.abspath(final)), final.resolve()}
    for raw in inputs:
        source = Path(raw).expanduser()
        for inp in {Path(os.path.abspath(source)), source.resolve()}:
            for target in targets:
                if _within(inp, target):
                    what = "is" if inp == target else "holds"
                    raise ValueError(f"output {final} {what} an input of this command ({source}): choose another path")
    if os.path.lexists(final):
        for name, place in _protected():
            if any(_within(place, target) for target in targets):
                raise ValueError(f"refusing to replace {final}: it is or holds {name}")
        kind = "directory" if final.is_dir() else "file"
        if kind == "directory" and not directory:
            raise ValueError(f"{final} is a directory; the output is a file: choose another path")
        if kind == "file" and directory:
            raise ValueError(f"{final} is a file; the output is a directory: choose another path")
        if not force:
            link = f" (a symlink to {os.readlink(final)})" if final.is_symlink() else ""
            raise FileExistsError(f"{final} already exists{link}; pass force=True (--force) to replace it")
    _report_stale(final)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(folder: PathLike) -> list[Path]:
    """steerkit temporaries in ``folder`` whose writing process is gone (killed before it could remove them)."""
    folder = Path(folder)
    found = []
    for tag in (TMP_TAG, OLD_TAG):
        for item in sorted(folder.glob(f".*{tag}*")):
            try:
                pid = int(item.name.rsplit(tag, 1)[1].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid) or pid == os.getpid() and str(item) not in _live:
                found.append(item)
    return found


_reported: set[Path] = set()  # stale temporaries already named in this process


def _report_stale(final: Path) -> None:
    if not final.parent.is_dir():
        return
    stale = [p for p in stale_temporaries(final.parent) if p.name.startswith(f".{final.name}.steerkit-")]
    stale = [p for p in stale if p not in _reported]
    _reported.update(stale)
    if stale:
        warnings.warn(
            f"{len(stale)} temporary file(s) left by an interrupted steerkit run beside {final} "
            f"(e.g. {stale[0].name}); remove them with: steerkit clean {final.parent}",
            stacklevel=3,
        )


def original_name(temporary: Path) -> str:
    """``out`` for ``.out.steerkit-tmp-12-ab`` (or ``-old-``)."""
    for tag in (TMP_TAG, OLD_TAG):
        if tag in temporary.name:
            return temporary.name[1:].rsplit(tag, 1)[0]
    raise ValueError(f"{temporary} is not a steerkit temporary")


def clean(folder: PathLike) -> list[tuple[Path, str]]:
    """Remove the stale temporaries in ``folder``; a set-aside old output whose new one never arrived is put back.

    Returns ``(path, "removed" | "restored")`` for each. Temporaries of running processes are left alone.
    """
    done = []
    for item in stale_temporaries(folder):
        final = item.with_name(original_name(item))
        if OLD_TAG in item.name and not os.path.lexists(final):
            os.rename(item, final)
            done.append((final, "restored"))
        else:
            remove_created(item)
            done.append((item, "removed"))
    return done


def confined(root: PathLike, name: str, what: str = "file") -> Path:
    """``root/name`` for a name read from a file in ``root`` (an index, a config): a plain relative name that
    stays inside ``root``, also through symlinks, or a ValueError naming it.

    A Hugging Face cache snapshot (``models--x/snapshots/REV``) may link into its repository's ``blobs``.
    """
    root = Path(root)
    rel = Path(name) if isinstance(name, str) else None
    if rel is None or not name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} {name!r} named in {root} is not a plain name inside that folder")
    full = root / rel
    real, home = full.resolve(), root.resolve()
    allowed = [home]
    if home.parent.name == "snapshots" and home.parent.parent.name.split("--")[0] in ("models", "datasets"):
        allowed.append(home.parent.parent / "blobs")
    if not any(_within(real, place) for place in allowed):
        raise ValueError(f"{what} {name!r} in {root} leads outside that folder (to {real}): refusing to read it")
    return full


def read_text(path: PathLike, what: str = "file") -> str:
    """A UTF-8 text file's contents, or a ValueError naming the file when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


# --- writing -----------------------------------------------------------------------------------------------

_live: set[str] = set()  # temporaries being written by this process (removed by the SIGTERM handler too)
_lock = threading.Lock()
_handler_depth = 0
_previous_handler = None


def remove_created(path: Path) -> None:
    """Delete a file or folder that steerkit itself created (a temporary, a set-aside output, its own checkpoint)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _on_sigterm(signum, frame):
    for name in list(_live):
        remove_created(Path(name))
    if callable(_previous_handler):
        _previous_handler(signum, frame)
    raise Terminated(signum)


@contextlib.contextmanager
def _removed_on_sigterm(tmp: Path) -> Iterator[None]:
    """Track ``tmp``; in the main thread, turn SIGTERM into an exception so ``finally`` blocks run."""
    global _handler_depth, _previous_handler
    main = threading.current_thread() is threading.main_thread()
    with _lock:
        _live.add(str(tmp))
        if main:
            if _handler_depth == 0:
                _previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            _handler_depth += 1
    try:
        yield
    finally:
        with _lock:
            _live.discard(str(tmp))
            if main:
                _handler_depth -= 1
                if _handler_depth == 0:
                    signal.signal(signal.SIGTERM, _previous_handler or signal.SIG_DFL)


def _sibling(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(
    path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (), directory: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The caller creates a file (or, with ``directory=True``, a folder) at the yielded path. The rules of
    ``check_output`` apply before anything is written; with ``force`` the previous output is kept until the
    new one is in place.
    """
    final = check_output(path, force=force, inputs=inputs, directory=directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, TMP_TAG)
    with _removed_on_sigterm(tmp):
        try:
            yield tmp
            if not os.path.lexists(tmp):
                raise RuntimeError(f"nothing was written to {tmp}")
            if tmp.is_dir() != directory:
                raise RuntimeError(f"{tmp}: expected a {'folder' if directory else 'file'} to be written")
            _commit(tmp, final, force)
        finally:
            remove_created(tmp)


def _commit(tmp: Path, final: Path, force: bool) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` (allowed by ``force``) is set aside, then removed."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    if not force:  # it appeared while we worked
        raise FileExistsError(f"{final} appeared while steerkit was writing it; pass force=True to replace it")
    old = _sibling(final, OLD_TAG)
    os.rename(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    remove_created(old)


def save_safetensors(
    tensors: dict, path: PathLike, metadata: dict[str, str] | None = None, *, force: bool = False, inputs=()
) -> Path:
    """Write contiguous ``tensors`` to a safetensors file atomically; metadata values must be strings."""
    from safetensors.torch import save_file

    with atomic_path(path, force=force, inputs=inputs) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def write_text(text: str, path: PathLike, *, force: bool = False, inputs=()) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def iter_jsonl(path: PathLike, parse: Callable[[dict], T], expected: str) -> Iterator[T]:
    """``parse(row)`` for the JSON object on each non-empty line of a .jsonl file, read lazily.

    A line that is not a JSON object, or that ``parse`` rejects (KeyError, TypeError, ValueError), is a
    ValueError naming ``file:line`` and ``expected``; so is a file that is not UTF-8.
    """
    with open(path, encoding="utf-8") as handle:
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise TypeError(f"got a JSON {type(row).__name__}")
                    value = parse(row)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
                    raise ValueError(f"{path}:{number}: expected {expected} ({err})") from None
                yield value
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number + 1}: not UTF-8 text ({err.reason})") from None
