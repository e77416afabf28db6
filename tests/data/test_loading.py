import builtins
import json
from pathlib import Path

import pytest

from lightning_caopd.data.loading import load_rows, read_jsonl
from lightning_caopd.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def no_datasets(monkeypatch):
    """Make `import datasets` fail, whether or not it is installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_fixtures_load():
    assert len(load_rows(str(FIXTURES / "science_small.jsonl"))) == 6
    assert len(load_rows(str(FIXTURES / "tooluse_small.jsonl"))) == 5


def test_blank_lines_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, "b": \n{"a": 3}\n')
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and '{"a": 2, "b":' in msg
    assert "fix or delete that line" in msg


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_rows(str(path))


def test_missing_answer_row_names_row_and_field(tmp_path):
    from lightning_caopd.tasks import science

    path = tmp_path / "sci.jsonl"
    good = {"prompt": [{"role": "user", "content": "Q?"}], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": good["prompt"]}) + "\n")
    rows = load_rows(str(path))
    with pytest.raises(DataError) as err:
        [science.row_to_item(r, i, str(path)) for i, r in enumerate(rows)]
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "'answer'" in msg


@pytest.mark.parametrize("source", ["data/nope.jsonl", "./nope", "/tmp/no/such/dir", "nope.json"])
def test_missing_path(source):
    with pytest.raises(DataError, match="does not exist") as err:
        load_rows(source)
    assert source in str(err.value)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_offline(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    with pytest.raises(DataError) as err:
        load_rows("someone/sciknoweval-chem", split="test")
    msg = str(err.value)
    assert "offline" in msg and var in msg
    assert "local JSONL" in msg and "save_to_disk" in msg


def test_hub_name_without_datasets_package(monkeypatch, no_datasets):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError) as err:
        load_rows("someone/tooluse")
    msg = str(err.value)
    assert "`datasets` package" in msg and "local JSONL" in msg and "save_to_disk" in msg


def test_save_to_disk_dir_without_datasets_package(tmp_path, no_datasets):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(DataError, match="`datasets` package"):
        load_rows(str(tmp_path), split="train")


def test_plain_directory(tmp_path):
    with pytest.raises(DataError, match="not one written by `save_to_disk`"):
        load_rows(str(tmp_path))


def test_json_file_list_and_splits(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert load_rows(str(rows)) == [{"a": 1}, {"a": 2}]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [{"a": 1}], "test": [{"a": 2}]}))
    assert load_rows(str(splits), split="test") == [{"a": 2}]
    with pytest.raises(DataError, match="several splits"):
        load_rows(str(splits))
    with pytest.raises(DataError, match="no split 'dev'"):
        load_rows(str(splits), split="dev")
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as `to_json` writes
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert load_rows(str(lines)) == [{"a": 1}, {"a": 2}]


class _FakeDataset:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module, so the loader's logic is tested without the package."""
    import sys
    import types

    module = types.ModuleType("datasets")
    module.load_from_disk = lambda path: {
        "train": _FakeDataset([{"a": 1}]),
        "test": _FakeDataset([{"a": 2}]),
    }

    def load_dataset(name, split=None):
        try:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        except OSError as err:
            raise RuntimeError(f"Couldn't load {name}") from err

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return module


def test_save_to_disk_dict_picks_split(tmp_path, fake_datasets):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    assert load_rows(str(tmp_path), split="test") == [{"a": 2}]
    with pytest.raises(DataError, match="several splits"):
        load_rows(str(tmp_path))


def test_hub_network_failure_reads_as_offline(fake_datasets):
    with pytest.raises(DataError) as err:
        load_rows("someone/tooluse", split="train")
    msg = str(err.value)
    assert "offline" in msg and "local JSONL" in msg and "save_to_disk" in msg


def test_hub_other_failure_is_reported(fake_datasets):
    def load_dataset(name, split=None):
        raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub")

    fake_datasets.load_dataset = load_dataset
    with pytest.raises(DataError, match="Check the name and split"):
        load_rows("someone/typo")
