"""A task of one's own: data, verifier and configs in a folder outside the package.

`tests/fixtures/own_task/` holds what a user writes: ``capitals.jsonl``, ``capitals.py`` (the
verifier) and ``conf/`` (``data/capitals.yaml``, ``experiment/capitals.yaml``, run with
``method=opd`` or ``method=caopd``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_caopd import runner
from lightning_caopd.data.rows import JsonlDataModule
from lightning_caopd.errors import ConfigError, DataError, VerifierError
from lightning_caopd.tasks.base import task_scores
from lightning_caopd.tasks.custom import FunctionTask
from tests.fixtures.runs import logged

OWN = Path(__file__).parent / "fixtures" / "own_task"
ROWS = OWN / "capitals.jsonl"
SHORT = [
    "trainer.max_steps=2",
    "method.rollout.num_rollouts=2",
    "method.rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "data.eval_batch_size=6",
    "logger=csv",
    "callbacks=minimal",
]


@pytest.fixture
def own(monkeypatch):
    """The user's folder importable (as when a run starts from it)."""
    monkeypatch.syspath_prepend(str(OWN))
    return OWN


def _cfg(make_cfg, tmp_path, tiny_dir, *overrides, method="caopd"):
    return make_cfg(
        [
            f"hydra.searchpath=[file://{OWN / 'conf'}]",
            "experiment=capitals",
            f"method={method}",
            "model=hf",
            f"model.pretrained_model_name_or_path={tiny_dir}",
            f"data.path={ROWS}",
            *SHORT,
            *overrides,
        ],
        tmp_path,
    )


@pytest.mark.parametrize("method", ["opd", "caopd"])
def test_own_task_trains_and_scores(method, own, make_cfg, tiny_dir, tmp_path):
    cfg = _cfg(make_cfg, tmp_path, tiny_dir, method=method)
    result = runner.run(cfg)
    assert result["run"]["steps"] == 2 and result["n"] == 12
    assert result["run"]["method"] == method
    records = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert {r["category"] for r in records} <= {"Europe", "Asia", "Africa"}
    assert all(r["gold"] for r in records)
    assert logged(tmp_path, "train/loss")  # a 2-step run logs its last step


def test_a_verifier_that_raises_does_not_stop_training(own, make_cfg, tiny_dir, tmp_path):
    cfg = _cfg(make_cfg, tmp_path, tiny_dir, "data.task.verify=capitals.flaky")
    result = runner.run(cfg)
    assert result["run"]["steps"] == 2 and result["accuracy"] == 0.0
    errors = logged(tmp_path, "train/verifier_errors")
    assert errors and errors[-1] >= 4  # 2 steps x 2 rollouts of random text, all raised
    with pytest.raises(VerifierError, match="capitals-.*IndexError"):
        runner.run(
            _cfg(
                make_cfg,
                tmp_path / "fatal",
                tiny_dir,
                "data.task.verify=capitals.flaky",
                "data.task.on_verifier_error=raise",
            )
        )


def test_rows_become_items_by_field_names():
    data = JsonlDataModule(
        str(ROWS),
        fields={
            "prompt": "question",
            "answer": "capital",
            "context": "note",
            "category": "continent",
        },
        num_eval=4,
    )
    item = data.load_items(str(ROWS), None)[0]
    assert item["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert item["answer"] == "Paris" and item["category"] == "Europe"
    assert item["demo"].endswith("Answer: Paris") and item["row"]["continent"] == "Europe"
    assert item["id"] == "capitals-0"
    fields = {"prompt": "question", "answer": "capital"}
    plain = JsonlDataModule(str(ROWS), fields=fields, num_eval=4)
    plain.setup()
    assert plain.eval_items[0]["demo"] == plain.eval_items[0]["answer"]  # no context: the answer


def test_graded_verifier_gives_a_mean_score_and_a_pass_score(own):
    task = FunctionTask("capitals.partial", pass_score=1.0)
    item = {"id": "x", "answer": "Paris"}
    texts = ["Answer: Paris", "Answer: Prague", "Answer: Rome"]
    assert task_scores(task, texts, [item] * 3) == ([1.0, 0.5, 0.0], 0)
    assert [task.verify(t, item) for t in texts] == [True, False, False]
    assert FunctionTask("capitals.partial", pass_score=0.5).verify("Answer: Prague", item)


def test_a_verifier_that_raises_counts_as_wrong_or_stops_the_run(caplog):
    def broken(completion, item):
        return completion.split()[5] == item["answer"]  # IndexError on short completions

    task = FunctionTask(broken)
    item = {"id": "row-7", "answer": "x"}
    scores, errors = task_scores(task, ["too short", "a b c d e x", "short"], [item] * 3)
    assert scores == [0.0, 1.0, 0.0] and errors == 2
    assert caplog.text.count("IndexError") == 1  # once per kind
    assert "row-7" in caplog.text and "too short" in caplog.text
    with pytest.raises(VerifierError, match="row-7.*IndexError.*'too short'"):
        task_scores(FunctionTask(broken, on_verifier_error="raise"), ["too short"], [item])
    with pytest.raises(ValueError, match="not a bool or a score"):
        FunctionTask(lambda c, i: 2).score("x", item)


# --- mistakes: each named, and reported before any model or base loads ------------------------


# (`no_models`, tests/conftest.py: the run fails the test if it loads a model)


def _bad_rows(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(ROWS.read_text() + text)
    return path


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("data.task.verify=capitalz.verify", ConfigError, "module 'capitalz'.*No module named"),
        ("data.task.verify=capitals.verfy", ConfigError, "has no 'verfy'.*'partial'"),
        ("data.task.verify=capitals", ConfigError, "not a dotted path"),
        ("data.path=nowhere.jsonl", DataError, "nowhere.jsonl does not exist"),
        ("data.fields.answer=city", DataError, "capitals.jsonl, row 1: field 'city' is missing"),
        ("+data.fields.colour=x", ConfigError, r"data.fields has \['colour'\]"),
        ("data.task.pass_score=0", ConfigError, "pass_score=0"),
        ("data.task.on_verifier_error=ignore", ConfigError, "on_verifier_error='ignore'"),
    ],
)
def test_mistakes_are_named_before_any_model_loads(
    override, error, message, own, no_models, make_cfg, tiny_dir, tmp_path
):
    cfg = _cfg(make_cfg, tmp_path, tiny_dir, override)
    with pytest.raises(error, match=message):
        runner.run(cfg)


def test_a_bad_row_is_named_by_file_and_row(own, no_models, make_cfg, tiny_dir, tmp_path):
    rows = _bad_rows(tmp_path, '{"question": "Capital of Peru?"}\n')
    cfg = _cfg(make_cfg, tmp_path, tiny_dir, f"data.path={rows}")
    with pytest.raises(DataError, match="rows.jsonl, row 37: field 'capital' is missing"):
        runner.run(cfg)
    rows.write_text('{"question": 3, "capital": "x"}\n')
    with pytest.raises(DataError, match="row 1: field 'question' is neither"):
        runner.run(_cfg(make_cfg, tmp_path, tiny_dir, f"data.path={rows}"))


def test_a_row_to_item_that_raises_is_named_with_its_row(own, tmp_path):
    (tmp_path / "convert.py").write_text(
        "def row_to_item(row, index, source):\n"
        "    return {'id': str(index), 'messages': [{'role': 'user', 'content': row['q']}],\n"
        "            'answer': row['capital'], 'category': 'x'}\n"
    )
    shutil.copy(ROWS, tmp_path / "rows.jsonl")
    sys.path.insert(0, str(tmp_path))
    try:
        from lightning_caopd.data.rows import RowsDataModule

        data = RowsDataModule(str(tmp_path / "rows.jsonl"), "convert.row_to_item", num_eval=2)
        with pytest.raises(DataError, match=r"rows.jsonl, row 1: row_to_item raised KeyError: 'q'"):
            data.setup()
        (tmp_path / "rows.jsonl").write_text('{"q": "a?", "capital": "b"}\n' * 3)
        data = RowsDataModule(str(tmp_path / "rows.jsonl"), "convert.row_to_item", num_eval=1)
        with pytest.raises(DataError, match=r"row 1: the item row_to_item made has no \['demo'\]"):
            data.setup()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("convert", None)


@pytest.mark.parametrize(
    "method, where",
    [
        ("opd", ["--config-dir", "conf"]),
        ("caopd", [f"hydra.searchpath=[file://{OWN / 'conf'}]"]),
    ],
)
def test_own_task_through_the_entry_points(method, where, tiny_dir, tmp_path):
    """`python -m lightning_caopd.train` from the user's folder (its configs by --config-dir or
    hydra.searchpath), then `python -m lightning_caopd.evaluate checkpoint=...` finds them again."""
    run_dir = tmp_path / "run"
    common = [f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    train = [
        sys.executable,
        "-m",
        "lightning_caopd.train",
        *where,
        "experiment=capitals",
        f"method={method}",
        "model=hf",
        f"model.pretrained_model_name_or_path={tiny_dir}",
        f"data.path={ROWS}",
        *[o for o in SHORT if not o.startswith("callbacks=")],
        *common,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(train, cwd=OWN, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert trained["run"]["experiment"] == f"capitals_{method}" and trained["run"]["steps"] == 2

    evaluate = [
        sys.executable,
        "-m",
        "lightning_caopd.evaluate",
        f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    done = subprocess.run(evaluate, cwd=OWN, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["n"] == trained["n"] == 12
    assert scored["accuracy"] == trained["accuracy"]
    assert set(scored["by_category"]) <= {"Europe", "Asia", "Africa"}
