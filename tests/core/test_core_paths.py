"""write_atomically: the file is replaced whole, keeps its permissions, leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from tailmon.paths import write_atomically


def test_replaces_the_file_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    os.chmod(path, 0o600)  # a report its owner kept private
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(path, 123)  # not text nor bytes: fails while writing
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
