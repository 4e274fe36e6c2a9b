"""Path roles: no output may be an input, however it is spelt; outputs must be writable."""

from __future__ import annotations

import os

import pytest

from tokfusion_jax import paths
from tokfusion_jax.errors import DataError


@pytest.fixture()
def tree(tmp_path):
    """tmp/data/vis/a.png, tmp/data/ir/a.png, a link to vis/ and a hard link of ir/a.png."""
    for sub in ("vis", "ir"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        (tmp_path / "data" / sub / "a.png").write_bytes(b"input " + sub.encode())
    os.symlink(tmp_path / "data" / "vis", tmp_path / "vis_link")
    os.link(tmp_path / "data" / "ir" / "a.png", tmp_path / "hard.png")
    return tmp_path


def _refused(inputs, outputs, *names, replaced=()):
    with pytest.raises(DataError) as info:
        paths.check_roles(inputs, outputs, replaced=replaced)
    message = str(info.value)
    for name in names:
        assert str(name) in message, message
    return message


@pytest.mark.parametrize(
    "spelling",
    ["data/vis/a.png", "data/ir/../vis/a.png", "vis_link/a.png", "./data//vis/a.png"],
)
def test_an_output_that_is_an_input_file_is_refused(tree, spelling):
    vis = tree / "data" / "vis" / "a.png"
    out = str(tree / spelling)
    _refused([("--vis", vis)], [("--out", out)], "--out", "--vis", out)


def test_hard_links_and_folders_are_the_same_input(tree):
    _refused([("--ir", tree / "data" / "ir" / "a.png")], [("--out", tree / "hard.png")], "--ir")
    _refused([("--vis_dir", tree / "data" / "vis")], [("--out_dir", tree / "vis_link")])
    _refused([("--vis_dir", tree / "data" / "vis")], [("--out_dir", tree / "data/ir/../vis/")])


def test_distinct_paths_pass(tree):
    paths.check_roles(
        [("--vis", tree / "data" / "vis" / "a.png"), ("--ir", tree / "data" / "ir" / "a.png")],
        [("--out", tree / "fused.png"), ("--out_dir", tree / "data" / "vis" / "fused")],
    )
    paths.check_roles([("x", b"in-memory bytes"), ("y", "")], [("--out", tree / "o.png")])


def test_a_replaced_folder_may_not_hold_an_input(tree):
    inputs = [("--source", tree / "data" / "vis" / "a.png")]
    _refused(inputs, [], "replaced as a whole", "--out", replaced=[("--out", tree / "data")])
    _refused(inputs, [], "--out", replaced=[("--out", tree / "vis_link")])
    paths.check_roles(inputs, [], replaced=[("--out", tree / "data" / "ir")])


def test_output_file_checks(tree):
    paths.check_output_file(tree / "new" / "deeper" / "o.png", "--out")
    with pytest.raises(DataError, match="is a folder"):
        paths.check_output_file(tree / "data", "--out")
    with pytest.raises(DataError, match="output exists"):
        paths.check_output_file(tree / "hard.png", "--out")
    paths.check_output_file(tree / "hard.png", "--out", overwrite=True)
    with pytest.raises(DataError, match="is a file, not a folder"):
        paths.check_output_file(tree / "hard.png" / "o.png", "--grid")


def test_output_folder_checks(tree):
    paths.check_output_folder(tree / "data", "--out")
    paths.check_output_folder(tree / "brand" / "new", "--out")
    with pytest.raises(DataError, match="exists and is not a folder"):
        paths.check_output_folder(tree / "hard.png", "--out")
    with pytest.raises(DataError, match="is a file, not a folder"):
        paths.check_output_folder(tree / "hard.png" / "sub", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable"):
            paths.check_output_file(ro / "o.png", "--out")
    finally:
        ro.chmod(0o700)
