"""Where a command may write, checked before its work starts, and directories written whole.

The rules every command follows (``build``, ``demo``, ``score``, ``transfer``, ``mask``):

* nothing is written into a model directory the command reads: an ``--out`` that is the ``--model``
  directory (or the transfer's teacher) or lies inside it is refused, with or without ``--force``;
* an output directory that exists and is not empty must hold a previous output of the same command
  (each command says what that looks like); anything else is refused unless ``--force``, which lets the
  command write its files into it and leaves every other file alone;
* the place must be writable: the nearest existing folder is probed with a temporary file, so a read-only
  or misspelt location fails in one line before a long run, not after it;
* a directory of several files (a built model) is written into a hidden staging folder inside ``--out``
  and moved in file by file (``write_dir``): an interrupted save leaves no half-written file behind, and the
  moves stay on ``--out``'s file system (a mount point, a folder in a read-only parent).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from headscope.heads import HeadscopeError, file_mode


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Raise a ``HeadscopeError`` unless ``path`` (a file or folder, existing or not) can be created or written."""
    target = Path(path).absolute()
    folder = _nearest_existing(target if target.is_dir() else target.parent)
    if not folder.is_dir():
        raise HeadscopeError(f"cannot write {path}: {folder} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise HeadscopeError(f"cannot write {path}: {err.strerror or err} ({folder})") from None


def check_not_inside(out: str | os.PathLike, models: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is one of ``models`` (model directories or files the command reads) or lies inside one."""
    target = Path(out).resolve()
    for model in models:
        if model is None:
            continue
        source = Path(model).resolve()
        if target == source or source in target.parents:
            raise HeadscopeError(f"--out {out} is {'the' if target == source else 'inside the'} model directory {model}; "
                                 "headscope never writes into a model it reads: choose another --out")


def check_output_file(out: str | os.PathLike, models: Iterable[str | os.PathLike | None] = (),
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check an output file: not a directory, not one of the files the command reads (``inputs``), outside every
    model directory, writable. Returns it as a Path."""
    path = Path(out)
    if path.is_dir():
        raise HeadscopeError(f"--out {out} is a directory; give a file name")
    for source in inputs:
        if source is not None and path.resolve() == Path(source).resolve():
            raise HeadscopeError(f"--out {out} is one of the command's inputs ({source}); choose another file")
    check_not_inside(path, models)
    check_writable(path)
    return path


def check_output_dir(out: str | os.PathLike, what: str, models: Iterable[str | os.PathLike | None] = (),
                     is_previous: Callable[[Path], bool] | None = None, force: bool = False) -> Path:
    """Check an output directory against the rules in the module docstring.

    Args:
        out: the ``--out`` directory.
        what: what a previous output of the command is, for the message (e.g. "hybrid built by `headscope build`").
        models: model directories (or files) the command reads; None entries are skipped.
        is_previous: tells a previous output of this command from anything else; None: the command
            checks a non-empty directory itself.
        force: accept a non-empty directory that is not a previous output.
    Returns:
        ``out`` as a Path.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise HeadscopeError(f"--out {out} exists and is not a directory")
    check_not_inside(path, models)
    if is_previous is not None and not force and path.is_dir() and any(path.iterdir()) and not is_previous(path):
        raise HeadscopeError(f"--out {out} is not empty and holds no {what}; choose a new or empty directory, "
                             "or pass --force to write into it")
    check_writable(path)
    return path


def visible_entries(path: Path) -> list[Path]:
    """The entries of ``path`` a user put or sees there (names not starting with a dot: staging and temporary files)."""
    return [entry for entry in path.iterdir() if not entry.name.startswith(".")]


def give_usual_mode(folder: Path) -> None:
    """Give every file in ``folder`` the mode ``open()`` would (``file_mode``): savers such as safetensors make
    their files owner-only."""
    mode = file_mode()
    for entry in folder.iterdir():
        if entry.is_file():
            os.chmod(entry, mode)


def write_dir(out: str | os.PathLike, write: Callable[[Path], None], stale: Iterable[str] = ()) -> Path:
    """Run ``write(staging)`` on a fresh hidden folder inside ``out``, then move its files into ``out``.

    Each file arrives by an atomic rename with the usual permissions (``give_usual_mode``). Then the names in ``stale`` that this write did not make are removed: a previous
    output's files, such as weight shards of another layout, which transformers would load before the new ones.
    On any error or interrupt the staging folder is removed and ``out`` keeps what it held (a folder made for this
    write is removed again).
    """
    target = Path(out)
    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target, prefix=".staging.", suffix=".tmp"))
    try:
        write(staging)
        give_usual_mode(staging)
        written = set()
        for entry in sorted(staging.iterdir()):
            os.replace(entry, target / entry.name)
            written.add(entry.name)
        for name in set(stale) - written:
            (target / name).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(target.iterdir()):
            target.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return target
