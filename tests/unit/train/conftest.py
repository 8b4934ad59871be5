"""Fixtures of the training tests."""

import pytest

from .helpers import write_pair_files


@pytest.fixture()
def data_dir(tmp_path):
    """memory.jsonl (40 records) and stream-0/1.jsonl (15 each), the data of ``helpers.stage_config``."""
    d = tmp_path / "data"
    d.mkdir()
    write_pair_files(d)
    return d
