"""Files the harness writes: atomic, and readable by whoever an ordinary file would be."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest
import torch

from eebench import io


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: io.write_text(p, "x"),
        lambda p: io.write_json(p, {"a": 1}),
        lambda p: io.save_tensors(p, {"t": torch.zeros(2)}),
        lambda p: io.write_csv(p, pd.DataFrame({"a": [1]})),
    ],
)
def test_written_files_get_the_umask_mode(tmp_path, umask_022, write):
    path = tmp_path / "out.file"
    write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert not list(tmp_path.glob(".*.tmp"))


def test_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        io.write_text(tmp_path / "private", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
