"""The run directory: atomic run files that honour the umask, metrics recorded exactly once."""

import json
import os
import stat

import pytest

from r3v_fast.engine.rundir import RunDir, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    # A plain open() creates 0o666 & ~umask; the atomic writer must give the same mode.
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
