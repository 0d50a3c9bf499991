"""Where a checkpoint writer (``convert``, ``export_lerobot``) puts its folder, and how.

A writer never writes into the destination itself: :func:`write_directory` hands it a new
folder beside the destination and renames that folder into place once every file is written, so
a failure leaves the destination as it was and no reader ever sees half a checkpoint. Before
anything is written the destination is refused when

* it overlaps the source: it is the source, holds it or lies inside it (links resolved), since
  replacing it would delete the checkpoint being read;
* it is, or holds, a symbolic link: a write through a link lands outside the folder the user
  named;
* it already holds files and the caller did not pass ``overwrite=True``. With it the old folder
  is replaced as a whole (moved aside, the new one renamed into place, the old one deleted),
  never merged with the new files. An empty folder is replaced without the flag.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DestinationError", "check_destination", "write_directory"]


class DestinationError(ValueError):
    """A destination folder a writer refuses; the message names it and what to do instead."""


@contextmanager
def write_directory(
    destination: str | Path, *, source: str | Path | None = None, overwrite: bool = False
) -> Iterator[Path]:
    """Yield an empty new folder to write a checkpoint into; when the block ends without an
    error it replaces ``destination``, otherwise it is deleted and ``destination`` is untouched.

    ``source`` is what the checkpoint was read from (a file or a folder), which the destination
    must not overlap; ``overwrite`` allows replacing a destination that holds files."""
    target = check_destination(destination, source=source, overwrite=overwrite)
    staging = _new_sibling(target, "partial")
    try:
        yield staging
        _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():  # the write or the rename failed: nothing of it stays behind
            shutil.rmtree(staging, ignore_errors=True)


def check_destination(
    destination: str | Path, *, source: str | Path | None = None, overwrite: bool = False
) -> Path:
    """The real path of ``destination`` once it is known to be safe to replace with a new folder
    (see the module docstring); raises :class:`DestinationError` naming the problem otherwise."""
    destination = Path(destination)
    if destination.is_symlink():
        raise DestinationError(
            f"{destination} is a symbolic link (to {os.readlink(destination)}); a writer does not "
            "write through links. Name the real folder, or remove the link."
        )
    target = destination.resolve()
    if target.parent == target:
        raise DestinationError(f"{destination} is the file system's root; name a folder to write.")
    if source is not None:
        _check_apart(destination, target, Path(source))
    if target.exists():
        _check_replaceable(destination, target, overwrite)
    return target


def _check_apart(destination: Path, target: Path, source: Path) -> None:
    """Refuse a destination that is, holds or lies inside the source or a file it links to."""
    for path in _source_paths(source):
        if path == target:
            relation = "is"
        elif target in path.parents:
            relation = "holds"
        elif path in target.parents:
            relation = "lies inside"
        else:
            continue
        shown = source if path == source.resolve() else f"{path} (a file {source} links to)"
        raise DestinationError(
            f"{destination} {relation} the source {shown}: writing there would destroy or mix "
            "with the checkpoint being read. Choose a destination outside the source."
        )


def _source_paths(source: Path) -> list[Path]:
    """The source's real path, and for a folder the real paths its links point to (a Hugging
    Face cache snapshot holds links into ``../../blobs``)."""
    if not os.path.lexists(source):
        return []
    paths = [source.resolve()]
    if source.is_dir():
        paths += [link.resolve() for link in _links_inside(source)]
    return paths


def _check_replaceable(destination: Path, target: Path, overwrite: bool) -> None:
    if not target.is_dir():
        raise DestinationError(
            f"{destination} is a file, not a folder; remove it or choose another destination."
        )
    links = _links_inside(target)
    if links:
        raise DestinationError(
            f"{destination} holds a symbolic link, {links[0]} -> {os.readlink(links[0])}; a "
            "writer refuses folders with links (a write through one lands outside the folder). "
            "Remove the links or choose a new destination."
        )
    entries = sorted(entry.name for entry in target.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DestinationError(
            f"{destination} already holds {len(entries)} entries ({shown}). Pass overwrite=True "
            "(--overwrite on the command line) to replace the folder as a whole, or choose a "
            "new destination."
        )


def _links_inside(folder: Path) -> list[Path]:
    """Every symbolic link under ``folder``; linked folders are listed, not entered."""
    links = []
    for root, folders, files in os.walk(folder):
        links += [Path(root, name) for name in folders + files if Path(root, name).is_symlink()]
    return sorted(links)


def _new_sibling(target: Path, kind: str) -> Path:
    """A new empty folder beside ``target``: the same file system, so renames are atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent / f".{target.name}.{secrets.token_hex(4)}.{kind}"
    try:
        folder.mkdir()
    except OSError as error:
        raise OSError(
            f"cannot create {folder} ({error.strerror}): a writer fills a new folder beside "
            f"{target} and renames it into place, so it needs write access to {target.parent}."
        ) from error
    return folder


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        # fails, rather than merging, if a folder with files appeared there meanwhile
        os.rename(staging, target)
        return
    if not overwrite and target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        raise DestinationError(f"{target} received files while the checkpoint was written.")
    aside = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
    os.rename(target, aside)  # renames a link itself, never what it points to
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside)
