"""Reliability: exact resume after a kill, atomic files, bad input and generations, NaN steps.

Bad-input cases tested elsewhere (not repeated here): malformed JSONL, an empty file and a row
without its answer (tests/data/test_loading.py, tests/test_verifiers.py), K < 2 with CaOPD
(tests/test_e2e.py) and student/teacher tokenizers that differ (tests/test_domains.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lightning_caopd.calibration import CaOPD
from lightning_caopd.checkpointing import AtomicCheckpointIO
from lightning_caopd.files import atomic_write
from lightning_caopd.confidence import parse_confidence
from lightning_caopd.divergence import divergence_loss
from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.errors import NonFiniteError, ResumeError
from lightning_caopd.rollout import encode_chats
from lightning_caopd.runner import build, run
from lightning_caopd.tasks import science
from lightning_caopd.tasks.toy import ToyTask, make_items
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
KILL_AT = 3  # the run is killed while it waits before its 4th step, after saving step 3
# TINY with checkpoints every step, a moving (EMA) teacher and an LR schedule, so that resuming
# has every piece of state to get right: weights, teacher, optimizer, scheduler, data, RNGs
RESUME = [
    "experiment=opd",
    *[o for o in TINY if not o.startswith(("callbacks=", "trainer.max_steps"))],
    f"trainer.max_steps={STEPS}",
    "callbacks=default",
    "callbacks.progress=null",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.teacher_ema.rate=0.05",
    "method.scheduler={_target_:torch.optim.lr_scheduler.LinearLR,_partial_:true,start_factor:0.5,total_iters:6}",
    "method.optimizer.lr=1e-3",
    "threads=1",
    "trainer.log_every_n_steps=1",
]


class PauseAt(L.Callback):
    """Before the step after `step`, write `marker` and wait to be killed (a real callback)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(300)


class InjectNaN(L.Callback):
    """NaN in the student's logits on the chosen optimizer steps; records weight changes."""

    records: dict[str, list[dict]] = {}

    def __init__(self, steps: list[int], key: str) -> None:
        self.steps, self.key = set(steps), key
        InjectNaN.records[key] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.student.parameters()]
        self._step = trainer.global_step
        self._handle = None
        if self._step in self.steps:
            # only forwards with gradients (the loss), not the no-grad sampling
            self._handle = pl_module.student.get_output_embeddings().register_forward_hook(
                lambda mod, args, out: out * float("nan") if torch.is_grad_enabled() else out
            )

    def _record(self, pl_module) -> None:
        if self._handle is not None:
            self._handle.remove()
        changed = any(
            not torch.equal(a, p)
            for a, p in zip(self._before, pl_module.student.parameters(), strict=True)
        )
        InjectNaN.records[self.key].append(
            {"step": self._step, "nan": self._handle is not None, "changed": changed}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._record(pl_module)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(overrides: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _assert_same(a, b, path: str = "") -> None:
    """Equal JSON trees; floats to 1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6, rel=0), path
    else:
        assert a == b, path


def _logged(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


# --- 1 and 5: exact resume after SIGKILL, determinism ------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(toy_base, tmp_path_factory) -> Path:
    """The reference: the resume test's run, in one go, in this process; its directory."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(compose_cfg([*RESUME, f"model.path={toy_base}"], out))
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _losses(*files: Path) -> dict[int, float]:
    """train/loss by step from CSV logs (a later file overrides an earlier one's steps)."""
    out = {}
    for path in files:
        with open(path) as f:
            out.update(
                {
                    int(r["step"]): float(r["train/loss"])
                    for r in csv.DictReader(f)
                    if r.get("train/loss")
                }
            )
    return out


def test_same_run_twice_gives_identical_metrics(uninterrupted, toy_base, tmp_path):
    run(compose_cfg([*RESUME, f"model.path={toy_base}"], tmp_path))
    again = _metrics(tmp_path)
    assert again == _metrics(
        uninterrupted
    )  # exactly: deterministic, seeded data order and rollouts
    assert again["run"]["steps"] == STEPS and again["accuracy"] is not None
    assert _losses(tmp_path / "csv" / "metrics.csv") == _losses(
        uninterrupted / "csv" / "metrics.csv"
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, toy_base, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    overrides = [*RESUME, f"model.path={toy_base}", f"hydra.run.dir={run_dir}"]
    pause = [
        "+callbacks.pause._target_=tests.test_reliability.PauseAt",
        f"+callbacks.pause.step={KILL_AT}",
        f"+callbacks.pause.marker={marker}",
    ]
    proc = _train([*overrides, *pause], tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain values only
    assert ckpt["global_step"] == KILL_AT and not (run_dir / "metrics.json").exists()
    # what the checkpoint holds besides Lightning's own state
    assert {"python", "numpy", "torch"} <= ckpt["rng_states"].keys()
    [writer] = [v for k, v in ckpt["callbacks"].items() if k.startswith("MetricsWriter")]
    assert writer["initial"]["n"] == 24
    [data_position] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert data_position["batches"] == KILL_AT and data_position["generator"] is not None
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"]) and ckpt["lr_schedulers"]
    initial_png = (run_dir / "reliability_initial.png").stat().st_mtime_ns

    resumed = _train([*overrides, "ckpt_path=last"], tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    _assert_same(_metrics(run_dir), _metrics(uninterrupted))
    # every step's loss: steps 1-3 from the killed run's log (kept), 4-6 from the resumed one
    logs = run_dir / "csv"
    killed, resumed_log = (
        _losses(logs / "metrics.before-resume-1.csv"),
        _losses(logs / "metrics.csv"),
    )
    assert sorted(killed) == [0, 1, 2] and sorted(resumed_log) == [3, 4, 5]
    reference = _losses(uninterrupted / "csv" / "metrics.csv")
    assert {**killed, **resumed_log} == pytest.approx(reference, abs=1e-6, rel=0)
    # the evaluation before the first step came from the checkpoint, not a new evaluation
    assert (run_dir / "reliability_initial.png").stat().st_mtime_ns == initial_png
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == STEPS


def test_resume_without_a_checkpoint_is_a_clear_error(toy_base, tmp_path):
    cfg = compose_cfg([*RESUME, f"model.path={toy_base}", "ckpt_path=last"], tmp_path)
    with pytest.raises(
        ResumeError, match=r"no checkpoint to resume from at .*last\.ckpt.*hydra\.run\.dir"
    ):
        run(cfg)
    cfg = compose_cfg(
        [*RESUME, f"model.path={toy_base}", f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path
    )
    with pytest.raises(ResumeError, match="no such checkpoint file"):
        run(cfg)


_FAILING_WRITES = """
import resource, signal, sys, torch
from lightning_caopd.files import atomic_write
def save_atomic(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
big = {"w": torch.arange(1_000_000, dtype=torch.float32)}  # 4 MB: each write fails part-way
for save, path in ((save_atomic, sys.argv[1]), (torch.save, sys.argv[2])):
    try:
        save(big, path)
    except Exception as err:  # EFBIG, surfacing from torch's zip writer as a RuntimeError
        print("failed:", type(err).__name__)
"""


def test_failed_checkpoint_write_leaves_the_old_file(tmp_path):
    atomic, plain = tmp_path / "atomic" / "last.ckpt", tmp_path / "plain" / "last.ckpt"
    old = {"w": torch.ones(10)}
    for path in (atomic, plain):
        path.parent.mkdir()
        torch.save(old, path)
    before = atomic.read_bytes()
    out = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITES, str(atomic), str(plain)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.count("failed:") == 2, out.stdout + out.stderr
    assert plain.read_bytes() != before  # what the atomic write prevents: torch.save truncated it
    assert atomic.read_bytes() == before and torch.equal(torch.load(atomic)["w"], old["w"])
    assert [p.name for p in atomic.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    atomic_write(atomic, lambda f: torch.save({"w": torch.zeros(3)}, f))  # a good write replaces it
    assert torch.equal(torch.load(atomic)["w"], torch.zeros(3))


def test_trainer_config_makes_every_save_of_the_run_atomic(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["callbacks=default"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "x.ckpt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == ["x.ckpt"]


# --- 2: bad input ------------------------------------------------------------------------


def test_unknown_config_group_and_key_are_one_paragraph_errors(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "method=bogus", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Could not find 'method/bogus'" in out.stderr and "\tcaopd\n\topd\n" in out.stderr
    assert "Traceback" not in out.stderr
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'method\.bogus_key'"):
        compose_cfg(["method.bogus_key=1"], tmp_path)


def test_prompt_longer_than_the_limit_is_truncated_or_skipped_and_counted():
    tok = build_char_tokenizer()
    chats = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "much longer " * 4}],
    ]
    full, n = encode_chats(tok, chats)
    limit = len(full[0])
    assert n == 0 and len(full[1]) > limit
    cut, n = encode_chats(tok, chats, limit)
    assert n == 1 and cut[0] == full[0] and cut[1] == full[1][-limit:]  # left end dropped
    skipped, n = encode_chats(tok, chats, limit, "skip")
    assert n == 1 and skipped == [full[0], None]
    with pytest.raises(ValueError, match="'truncate' or 'skip'"):
        encode_chats(tok, chats, limit, "drop")


def test_training_step_skips_overflowing_prompts(toy_base, tmp_path):
    overrides = ["experiment=opd", f"model.path={toy_base}", *TINY, "method.rollout.prompt_overflow=skip"]
    module, _ = build(compose_cfg([*overrides, "method.rollout.max_prompt_length=2"], tmp_path))
    batch = make_items(2, 0, "train", 0)
    assert module.training_step(batch, 0) is None  # every prompt is too long: no loss, no step
    module, _ = build(compose_cfg([*overrides, "method.rollout.max_prompt_length=4096"], tmp_path))
    loss = module.training_step(batch, 0)["loss"]
    assert loss.requires_grad and torch.isfinite(loss)
    with pytest.raises(Exception, match="prompt_overflow='drop' is out of range"):
        build(compose_cfg([*overrides, "method.rollout.prompt_overflow=drop"], tmp_path))


# --- 3: bad generations ------------------------------------------------------------------


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte one token, as in GPT-2's alphabet) with an EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"eos_token": "<|end|>", "pad_token": "<|end|>"})
    return tok


BAD_TEXTS = [
    "",
    "   ",
    "Answer:",
    "Answer: q",
    "Confidence:",
    "Answer: q\nConfidence: lots",
    "Answer: q\nConfid",
    "\ufffd\ufffdAnswer: \ufffd\nConfidence: \ufffd",
]


@pytest.mark.parametrize("text", BAD_TEXTS)
def test_bad_completions_are_wrong_and_unparseable(text):
    toy_item = {"answer": "l", "family": "next"}
    assert ToyTask().verify(text, toy_item) is False
    assert parse_confidence(text) is None
    assert science.ScienceTask().verify(text, {"answer": "B", "options": ["a", "b"]}) is False


def test_non_utf8_bytes_decode_to_replacement_characters_and_the_splice_still_works():
    tok = _byte_tokenizer()
    eos = tok.eos_token_id
    good = tok("Answer: l\nConfidence: 0.9", add_special_tokens=False)["input_ids"]
    lead, cont = tok("\u00ff", add_special_tokens=False)["input_ids"]  # the bytes C3 BF
    broken = good[:8] + [cont, lead] + good[8:]  # a lone continuation byte, a lead byte before "\n"
    text = tok.decode(broken, skip_special_tokens=True)
    assert "\ufffd" in text and parse_confidence(text) == pytest.approx(0.9)
    caopd = CaOPD()
    answer_line = broken[:11]  # "Answer: l" with the two bad bytes, and its newline
    for ids, kept in (
        ([], []),
        ([eos], []),
        (broken + [eos], answer_line),
        ([lead] * 5, [lead] * 5),
        (good[:12], good[:10]),
    ):
        out = caopd.student_completion(ids, 0.25, tok)
        assert out[: len(kept)] == kept and out[-1] == eos  # sampled tokens kept up to the line
        text = tok.decode(out, skip_special_tokens=True)
        assert text.endswith("Confidence: 0.25") and parse_confidence(text) == 0.25


def test_empty_completion_row_adds_nothing_to_the_loss():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 7, requires_grad=True), torch.randn(3, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, _ = divergence_loss(s, t, mask)
    ref, _ = divergence_loss(s[[0, 2]], t[[0, 2]], mask[[0, 2]])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert torch.all(s.grad[1] == 0)


def test_training_on_length_limited_generations_without_confidence_lines(toy_base, tmp_path):
    # one new token: every rollout hits the limit and none has an answer or confidence line
    cfg = compose_cfg(
        [
            "experiment=caopd",
            f"model.path={toy_base}",
            *TINY,
            "method.rollout.max_new_tokens=1",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path,
    )
    result = run(cfg)
    assert (
        result is not None
        and json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 2
    )
    assert _logged(tmp_path, "train/format_rate") == [0.0, 0.0]
    assert _logged(tmp_path, "train/truncated_frac") == [1.0, 1.0]
    assert _logged(tmp_path, "train/rollout_accuracy") == [0.0, 0.0]
    assert all(math.isfinite(v) for v in _logged(tmp_path, "train/loss"))


# --- 4: non-finite loss or gradient -------------------------------------------------------


def _nan_overrides(toy_base, steps: list[int], key: str) -> list[str]:
    return [
        "experiment=opd",
        f"model.path={toy_base}",
        *TINY,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "method.optimizer.lr=1e-3",
        "+callbacks.nan._target_=tests.test_reliability.InjectNaN",
        f"+callbacks.nan.steps={steps}",
        f"+callbacks.nan.key={key}",
    ]


def test_nonfinite_step_is_skipped_logged_and_the_run_goes_on(toy_base, tmp_path):
    run(compose_cfg(_nan_overrides(toy_base, [1], "one"), tmp_path))
    records = InjectNaN.records["one"]
    assert [(r["step"], r["nan"], r["changed"]) for r in records] == [
        (0, False, True),
        (1, True, False),
        (2, False, True),  # the NaN step left the weights alone
    ]
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["steps"] == 3
    assert _logged(tmp_path, "train/skipped_nonfinite") == [0.0, 1.0, 1.0]
    assert math.isnan(_logged(tmp_path, "train/loss")[1])


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_message(toy_base, tmp_path):
    cfg = compose_cfg(
        [*_nan_overrides(toy_base, [0, 1, 2], "row"), "callbacks.nonfinite_guard.max_consecutive=2"], tmp_path
    )
    with pytest.raises(
        NonFiniteError,
        match=r"NaN or infinite in 2 steps in a row \(callbacks\.nonfinite_guard\.max_consecutive=2\)",
    ):
        run(cfg)
    records = InjectNaN.records["row"]
    assert [(r["nan"], r["changed"]) for r in records] == [(True, False), (True, False)]
    assert not (tmp_path / "metrics.json").exists()


def test_best_checkpoint_by_a_validation_metric(toy_base, tmp_path):
    # validation during training (every step) lets the `best` callback keep the best model by
    # val/ece (conf/callbacks/default.yaml); ties keep the earlier one
    cfg = compose_cfg(
        [
            "experiment=opd",
            f"model.path={toy_base}",
            *TINY,
            "callbacks=default",
            "callbacks.progress=null",
            "+trainer.val_check_interval=1",
        ],
        tmp_path,
    )
    run(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["best-step1.ckpt", "last.ckpt"] or ckpts == ["best-step2.ckpt", "last.ckpt"]
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    [best] = [v for k, v in last["callbacks"].items() if "val/ece" in k]
    scores = _logged(tmp_path, "val/ece")[1:]  # [0]: the evaluation before training
    assert len(scores) == 2 and best["best_model_score"].item() == pytest.approx(min(scores))
    step = 1 + scores.index(min(scores))
    assert Path(best["best_model_path"]).name == f"best-step{step}.ckpt"
    saved = torch.load(best["best_model_path"], map_location="cpu", weights_only=False)
    assert saved["global_step"] == step and "rng_states" in saved
