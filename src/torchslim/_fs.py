"""Writing results without ever losing what was there: temporary names, atomic replace, recovery.

Every file or folder torchslim writes is built under a hidden temporary name beside its final
name and then *published* by :func:`replace_path`:

- the name is free, or a file replaces a file: one ``rename`` (atomic on POSIX);
- a folder replaces a folder (or a file, or the other way round): on Linux one
  ``renameat2(RENAME_EXCHANGE)`` swaps the two names atomically, then the old copy, now under
  the hidden name, is deleted. A kill at any point leaves a complete copy, old or new, under the
  name.
- where the exchange is not available (other systems, some file systems), the old copy is first
  renamed to ``.NAME.previous-<id>`` and the new one then renamed onto the name. A kill between
  the two renames leaves no copy under the name; :func:`interrupted_replace` finds the two
  surviving copies, so that a reader (``ts.load``) can name them in its error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "drop_set_aside", "interrupted_replace", "remove_path", "replace_path", "set_aside",
           "staging_name"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NEW, _PREVIOUS = "new", "previous"


def staging_name(final: Path, what: str = _NEW) -> Path:
    """A hidden sibling of ``final`` that no other writer uses: ``.NAME.<what>-<id>``."""
    return final.with_name(f".{final.name}.{what}-{uuid.uuid4().hex[:10]}")


def remove_path(path: Path) -> None:
    """Delete a file or a folder (nothing if it is not there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exchange(a: Path, b: Path) -> None:
    """Swap two existing paths atomically (Linux ``renameat2``); ``OSError`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def replace_path(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move the finished ``src`` onto ``dst`` so that ``dst`` is always complete (see the module doc).

    ``src`` and ``dst`` must be on one file system (``src`` is normally :func:`staging_name` of
    ``dst``).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
        return
    if not src.is_dir() and not dst.is_dir():
        os.replace(src, dst)
        return
    try:
        _exchange(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        previous = staging_name(dst, _PREVIOUS)
        os.rename(dst, previous)
        os.rename(src, dst)
        remove_path(previous)
        return
    remove_path(src)  # the old copy, now under the hidden name


def set_aside(path: str | os.PathLike[str]) -> Path:
    """Rename ``path`` to a hidden ``.NAME.previous-<id>`` beside it, for a run that rebuilds it in place.

    The caller deletes it with :func:`drop_set_aside` once the new copy is complete; a kill in
    between leaves both (a resumable partial run under the name, the old one hidden beside it).
    """
    p = Path(path)
    previous = staging_name(p, _PREVIOUS)
    os.rename(p, previous)
    return previous


def drop_set_aside(path: str | os.PathLike[str]) -> None:
    """Delete every copy :func:`set_aside` left beside ``path``."""
    p = Path(path)
    for old in p.parent.glob(f".{p.name}.{_PREVIOUS}-*"):
        remove_path(old)


def interrupted_replace(path: str | os.PathLike[str]) -> str | None:
    """If ``path`` is missing because a replace was killed half-way, say where its copies are.

    Returns one sentence naming the complete new copy (``.NAME.new-*``) and the previous one
    (``.NAME.previous-*``), or None when no such copies lie beside ``path``.
    """
    p = Path(path)
    if p.exists() or not p.parent.is_dir():
        return None
    prefix = f".{p.name}."
    found: dict[str, list[Path]] = {_NEW: [], _PREVIOUS: []}
    for sibling in p.parent.iterdir():
        if sibling.name.startswith(prefix):
            kind = sibling.name[len(prefix):].split("-", 1)[0]
            if kind in found:
                found[kind].append(sibling)
    if not found[_PREVIOUS]:
        return None
    previous = max(found[_PREVIOUS], key=lambda q: q.stat().st_mtime)
    text = f"{p} is missing because replacing it was interrupted; the previous copy survives as {previous}"
    if found[_NEW]:
        newest = max(found[_NEW], key=lambda q: q.stat().st_mtime)
        text += f" and the new one as {newest}: rename the one you want to {p.name}"
    else:
        text += f": rename it to {p.name}"
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; publish it onto ``path`` only if the block succeeds.

    Works for files and folders (the block creates what it needs at the yielded path); nothing
    half-written is ever left at ``path``, and the temporary is removed on failure.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("done")
        >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
        ('done', ['a.txt'])
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    try:
        yield tmp
        replace_path(tmp, final)
    finally:
        remove_path(tmp) if tmp.exists() else None
