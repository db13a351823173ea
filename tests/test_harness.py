"""The suite's own shared files: the port counter and the machine-wide locks live in a private directory of the
temporary directory, which every local user can write to. Another user's plant there is refused, never followed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests import harness


@pytest.fixture
def scratch_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sticky, world-writable directory standing in for /tmp."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def test_a_link_planted_as_the_shared_directory_is_refused_and_its_target_untouched(
    tmp_path: Path, scratch_tmp: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (scratch_tmp / f"tunneld-test.{os.getuid()}").symlink_to(victim)
    with pytest.raises(RuntimeError, match="not a private directory"):
        harness.free_port()
    assert list(victim.iterdir()) == []


def test_a_link_planted_as_the_counter_is_never_written_through(tmp_path: Path, scratch_tmp: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    own = scratch_tmp / f"tunneld-test.{os.getuid()}"
    own.mkdir(mode=0o700)
    (own / "ports").symlink_to(victim)
    with pytest.raises(OSError):
        harness.free_port()
    assert victim.read_text() == "precious\n"
