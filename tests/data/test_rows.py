"""The science and tool-use DataModules: the held-out split, limits, local and Hub sources."""

from pathlib import Path

import pytest

from lightning_caopd.data.rows import ScienceDataModule, ToolUseDataModule, held_out_indices
from lightning_caopd.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"
SCIENCE = str(FIXTURES / "science_small.jsonl")
TOOLUSE = str(FIXTURES / "tooluse_small.jsonl")


def test_same_file_split_is_deterministic_and_disjoint():
    dm = ScienceDataModule(path=SCIENCE, num_eval=2)
    dm.setup("fit")
    again = ScienceDataModule(path=SCIENCE, eval_path=SCIENCE, num_eval=2)
    again.setup("validate")
    ids = lambda items: [it["id"] for it in items]  # noqa: E731
    assert len(dm.eval_items) == 2 and len(dm.train_items) == 4
    assert not set(ids(dm.eval_items)) & set(ids(dm.train_items))
    assert ids(dm.eval_items) == ids(again.eval_items)
    assert held_out_indices(100, 10, seed=0) != held_out_indices(100, 10, seed=1)


def test_limit_and_a_separate_eval_file(tmp_path):
    same = ToolUseDataModule(
        path=TOOLUSE, eval_path=str(Path(TOOLUSE).resolve()), num_eval=1, limit=4
    )
    same.setup()
    assert len(same.train_items) == 3 and len(same.eval_items) == 1  # paths compared resolved
    copy = tmp_path / "tooluse_eval.jsonl"
    copy.write_text(Path(TOOLUSE).read_text())
    other = ToolUseDataModule(path=TOOLUSE, eval_path=str(copy), num_eval=None, limit=2)
    other.setup()
    assert len(other.train_items) == 2 and len(other.eval_items) == 2  # nothing held out
    capped = ToolUseDataModule(path=TOOLUSE, eval_path=str(copy), num_eval=3)
    capped.setup()
    assert len(capped.train_items) == 5 and len(capped.eval_items) == 3
    assert isinstance(capped.eval_items[0]["answer"], list)


def test_holding_out_every_row_is_a_clear_error():
    dm = ScienceDataModule(path=SCIENCE, num_eval=6)
    with pytest.raises(DataError, match=r"data.num_eval.*data.eval_path"):
        dm.setup("fit")


def test_hub_name_offline_is_a_clear_error_through_the_datamodule(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = ScienceDataModule(path="someone/chem-mcq")
    with pytest.raises(DataError, match=r"offline.*local JSONL file"):
        dm.setup("fit")


def test_save_to_disk_directory(tmp_path):
    import datasets  # the `real` extra, which `make test` installs

    from lightning_caopd.data.loading import read_jsonl

    datasets.Dataset.from_list(read_jsonl(TOOLUSE)).save_to_disk(str(tmp_path / "ds"))
    dm = ToolUseDataModule(path=str(tmp_path / "ds"), num_eval=2)
    dm.setup()
    assert len(dm.train_items) == 3 and dm.eval_items[0]["category"] == "tooluse"
