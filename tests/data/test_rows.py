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


def test_duplicate_rows_are_counted_and_never_held_out(tmp_path, caplog):
    rows = Path(SCIENCE).read_text().splitlines()
    dup = tmp_path / "dups.jsonl"
    dup.write_text("\n".join([*rows, rows[0], rows[3], rows[0]]) + "\n")  # 9 rows, 6 prompts
    with caplog.at_level("WARNING", logger="lightning_caopd.data.rows"):
        dm = ScienceDataModule(path=str(dup), num_eval=3)
        dm.setup("fit")
    assert "5 of its 9 rows repeat another row's prompt (2 distinct prompts)" in caplog.text
    prompt = lambda it: str(it["messages"])  # noqa: E731
    held = {prompt(it) for it in dm.eval_items}
    assert len(dm.eval_items) == 3 and not held & {prompt(it) for it in dm.train_items}
    assert len(dm.train_items) == 6  # every copy of a repeated row trains
    with pytest.raises(DataError, match=r"only 4 of its 9 rows have a prompt no other row repeats"):
        ScienceDataModule(path=str(dup), num_eval=5).setup("fit")


def test_evaluation_rows_also_in_training_are_counted(tmp_path, caplog):
    rows = Path(SCIENCE).read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[2:]) + "\n")
    dm = ScienceDataModule(
        path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"), num_eval=None
    )
    with caplog.at_level("WARNING", logger="lightning_caopd.data.rows"):
        dm.setup("fit")
    assert "2 of the 4 evaluation rows" in caplog.text


def test_held_out_choice_without_duplicates_is_unchanged():
    # the rows chosen skip excluded ones only; with none excluded the choice is the seeded one
    assert held_out_indices(50, 5, seed=3, exclude=[]) == held_out_indices(50, 5, seed=3)
    chosen = held_out_indices(50, 5, seed=3)
    assert not set(held_out_indices(50, 5, seed=3, exclude=chosen[:2])) & set(chosen[:2])


def test_reference_format_training_rows_load_and_are_counted(tmp_path, caplog):
    import json
    import logging

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer with <answer>X</answer>."},
                {"role": "user", "content": f"Question {i}?"},
            ],
            "output_text": f"<reasoning>...</reasoning>\n<answer>{letter}</answer>",
        }
        for i, letter in enumerate("ABCD")
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ScienceDataModule(path=str(path), eval_path=SCIENCE, num_eval=None)
    with caplog.at_level(logging.INFO, logger="lightning_caopd.data.rows"):
        dm.setup("fit")
    assert [it["answer"] for it in dm.train_items] == list("ABCD")
    assert all("answer_from_demo" not in it for it in dm.train_items)
    assert len(dm.eval_items) == 6  # a separate eval set, scored whole
    assert "4 of 4 rows have no `answer`" in caplog.text


SHARED = Path(__file__).parents[3] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data on this machine")
def test_shared_dev_rows_still_load():
    science = ScienceDataModule(path=str(SHARED / "science_dev.jsonl"))
    tooluse = ToolUseDataModule(path=str(SHARED / "tooluse_dev.jsonl"))
    items = science.load_items(science.path, None)
    assert len(items) == 200 and all(it["answer"] in "ABCD" for it in items)
    assert len(tooluse.load_items(tooluse.path, None)) == 40
