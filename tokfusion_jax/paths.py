"""Path roles of a command: what it reads (inputs) and what it writes (outputs).

Every CLI declares both before it writes anything, so that no command can write over one of its
inputs, whatever the spelling: ``..``, symbolic links, hard links, ``~`` and case-insensitive
file systems all resolve to the same file. Outputs are also checked for being writable where
they will be written (a file where a folder is needed, a folder where a file is needed), so a
run does not fail at its end with an OS error after minutes of work.

    paths.check_roles(inputs=[("--vis", vis), ("--ir", ir)], outputs=[("--out", out)])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tokfusion_jax.errors import DataError

PathLike = str | os.PathLike
Role = tuple[str, PathLike]  # (label naming where the path came from, e.g. "--out", the path)


def resolve(path: PathLike) -> str:
    """The absolute path with ``~``, ``..`` and symbolic links resolved."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inode(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing path (the identity hard links share), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether `a` and `b` name the same file or folder (links, hard links, ``..`` included)."""
    ra, rb = resolve(a), resolve(b)
    return ra == rb or (_inode(ra) is not None and _inode(ra) == _inode(rb))


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """Whether `path` lies inside `folder` (or is it), after resolving both."""
    target = _inode(resolve(folder))
    p = resolve(path)
    while True:
        if p == resolve(folder) or (target is not None and _inode(p) == target):
            return True
        if os.path.dirname(p) == p:
            return False
        p = os.path.dirname(p)


class _Index:
    """Paths by resolved name and by inode, for O(1) "is this one of them?" look-ups."""

    def __init__(self, roles: Iterable[Role]) -> None:
        self.by_key: dict[object, Role] = {}
        for label, p in roles:
            if not p or isinstance(p, bytes):  # in-memory images are nobody's output
                continue
            r = resolve(p)
            self.by_key.setdefault(r, (label, p))
            if (ino := _inode(r)) is not None:
                self.by_key.setdefault(ino, (label, p))

    def find(self, path: PathLike) -> Role | None:
        r = resolve(path)
        hit = self.by_key.get(r)
        if hit is None and (ino := _inode(r)) is not None:
            hit = self.by_key.get(ino)
        return hit


def check_roles(
    inputs: Iterable[Role], outputs: Iterable[Role], *, replaced: Iterable[Role] = ()
) -> None:
    """Raises `DataError` when an output is one of the inputs.

    Args:
      inputs: files and folders the command reads.
      outputs: files and folders it writes (folders: it writes files into them).
      replaced: folders it replaces as a whole (e.g. an atomically written checkpoint folder):
        no input may lie inside one either.
    """
    inputs = [(label, p) for label, p in inputs if p and not isinstance(p, bytes)]
    replaced = [(label, p) for label, p in replaced if p]
    index = _Index(inputs)
    for out_label, out in [*outputs, *replaced]:
        if out and (hit := index.find(out)) is not None:
            raise DataError(
                f"{out} ({out_label}) is the input {hit[1]} ({hit[0]}); writing there would "
                "replace the input, choose another output path"
            )
    for out_label, out in replaced:
        for in_label, inp in inputs:
            if is_inside(inp, out):
                raise DataError(
                    f"{out} ({out_label}) would be replaced as a whole, but it holds the input "
                    f"{inp} ({in_label}); choose another output path"
                )


def _nearest_existing(path: str) -> str:
    """`path` itself or its nearest ancestor that exists."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _check_creatable(path: str, label: str) -> None:
    """Every missing folder on the way to `path` can be created: its existing ancestor is a
    writable folder."""
    parent = _nearest_existing(os.path.dirname(path) or ".")
    if not os.path.isdir(parent):
        raise DataError(f"{path} ({label}): {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{path} ({label}): folder {parent} is not writable")


def check_output_file(path: PathLike, label: str, *, overwrite: bool = False) -> None:
    """`path` can be written as a file: not a folder, not existing unless `overwrite`, and its
    folder exists or can be created."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(p):
        raise DataError(f"{path} ({label}) is a folder; expected a file path")
    if os.path.lexists(p) and not overwrite:
        raise DataError(f"{path}: output exists (use --overwrite to replace it; {label})")
    _check_creatable(p, label)


def check_output_folder(path: PathLike, label: str) -> None:
    """`path` is a folder, or can be created as one."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(p) and not os.path.isdir(p):
        raise DataError(f"{path} ({label}) exists and is not a folder")
    if os.path.isdir(p):
        if not os.access(p, os.W_OK | os.X_OK):
            raise DataError(f"{path} ({label}): folder is not writable")
        return
    _check_creatable(p, label)


def labelled(label: str, paths: Sequence[PathLike]) -> list[Role]:
    """The same `label` for several paths (e.g. every image of one folder)."""
    return [(label, p) for p in paths]
