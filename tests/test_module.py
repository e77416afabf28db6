"""The training step (`lightning_caopd.module`): overlong prompts, short rollouts, loss paths."""

import json
import math
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lightning_caopd.calibration import CaOPD
from lightning_caopd.errors import ConfigError
from lightning_caopd.models import apply_lora, build_char_tokenizer, build_tiny_llama
from lightning_caopd.module import DistillationModule
from lightning_caopd.rollout import Rollouts
from lightning_caopd.runner import build, run
from lightning_caopd.settings import LossSettings, RolloutSettings
from lightning_caopd.step.loss import LossBatch, LossOutput
from lightning_caopd.tasks.toy import ToyTask, make_items
from lightning_caopd.templates import TeacherTemplate
from tests.fixtures.runs import ROOT, logged, subprocess_env


def test_training_step_skips_overflowing_prompts(toy_base, tiny_overrides, make_cfg, tmp_path):
    overrides = [
        "experiment=toy",
        "method=opd",
        f"model.path={toy_base}",
        *tiny_overrides,
        "method.rollout.prompt_overflow=skip",
    ]
    module, _ = build(make_cfg([*overrides, "method.rollout.max_prompt_length=2"], tmp_path))
    batch = make_items(2, 0, "train", 0)
    assert module.training_step(batch, 0) is None  # every prompt is too long: no loss, no step
    module, _ = build(make_cfg([*overrides, "method.rollout.max_prompt_length=4096"], tmp_path))
    loss = module.training_step(batch, 0)["loss"]
    assert loss.requires_grad and torch.isfinite(loss)
    with pytest.raises(ConfigError, match="prompt_overflow='drop' is out of range"):
        build(make_cfg([*overrides, "method.rollout.prompt_overflow=drop"], tmp_path))


def test_training_on_length_limited_generations_without_confidence_lines(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    # one new token: every rollout hits the limit and none has an answer or confidence line
    cfg = make_cfg(
        [
            "experiment=toy",
            "method=caopd",
            f"model.path={toy_base}",
            *tiny_overrides,
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
    assert logged(tmp_path, "train/format_rate") == [0.0, 0.0]
    assert logged(tmp_path, "train/truncated_frac") == [1.0, 1.0]
    assert logged(tmp_path, "train/rollout_accuracy") == [0.0, 0.0]
    assert all(math.isfinite(v) for v in logged(tmp_path, "train/loss"))


# --- method.loss: the top-k + tail and fused loss paths (lightning_caopd.step.loss) ---------


def _module(
    tied: bool = True,
    lora: list[str] | None = None,
    template: TeacherTemplate | None = None,
    targets: CaOPD | None = None,
    rollout: RolloutSettings | None = None,
    **loss,
) -> DistillationModule:
    """A DistillationModule on a tiny random Llama (head tied to the embedding or not).

    The same arguments give the same weights; the teacher is the student's copy moved by seeded
    noise, so the divergence is not zero.
    """
    gen = torch.Generator().manual_seed(0)
    student = build_tiny_llama(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    if not tied:  # a head of its own, different from the embedding
        student.config.tie_word_embeddings = False
        head = torch.randn(student.lm_head.weight.shape, generator=gen) * 0.1
        student.lm_head.weight = torch.nn.Parameter(head)
    if lora:
        student = apply_lora(student, r=2, alpha=4, target_modules=lora)
    module = DistillationModule(
        student=student,
        tokenizer=build_char_tokenizer(),
        task=ToyTask(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        template=template or TeacherTemplate(),
        rollout=rollout or RolloutSettings(num_rollouts=3, max_new_tokens=10),
        loss=LossSettings(**loss),
        targets=targets,
    )
    if module.teacher.owns_weights:
        with torch.no_grad():
            for p in module.teacher.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def _divergence(module, prompts, teacher_prompts, completions, rows=None) -> LossOutput:
    """The module's loss path on given tokens (no importance correction)."""
    batch = LossBatch(prompts, teacher_prompts, completions, rows, device=module.device)
    return module.loss_path(module.student, module.teacher, batch)


def _step(module: DistillationModule, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """One training_step's loss and the student's gradients (rollouts drawn from `seed`)."""
    module.student.zero_grad()
    torch.manual_seed(seed)
    loss = module.training_step(make_items(2, 0, "train", 0), 0)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], tol: float) -> None:
    assert a[0].item() > 0
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "loss",
    [
        {"divergence": "forward_kl"},
        {"divergence": "jsd", "jsd_beta": 0.3, "topk": 7, "skip_first_tokens": 1},
        {"divergence": "reverse_kl", "share_prompt_prefix": False, "chunk_size": 5},
        {"divergence": "forward_kl", "topk": 5, "topk_support": "student"},
    ],
)
def test_fused_training_step_equals_unfused(tied, loss):
    unfused = _module(tied, **loss)
    fused = _module(tied, **{**loss, "fused": True})
    a, b = _step(unfused), _step(fused)
    if not tied:
        assert "lm_head.weight" in a[1]  # the untied head is trained through the fused path
    _assert_same(a, b, 1e-5)


def test_fused_step_returns_no_logits_and_rollout_entropy_skips_it():
    from lightning_caopd.callbacks import RolloutEntropy

    module = _module(fused=True)
    torch.manual_seed(0)
    out = module.training_step(make_items(2, 0, "train", 0), 0)
    assert out["step"].logits is None and out["loss"].requires_grad
    logged_keys = []
    module.log_dict = lambda d, **kw: logged_keys.extend(d)  # what the callback would log
    trainer = SimpleNamespace(log_every_n_steps=1, fast_dev_run=False, should_stop=False)
    RolloutEntropy().on_train_batch_end(trainer, module, out, None, 0)
    assert logged_keys == []
    module = _module()
    torch.manual_seed(0)
    out = module.training_step(make_items(2, 0, "train", 0), 0)
    module.log_dict = lambda d, **kw: logged_keys.extend(d)
    RolloutEntropy().on_train_batch_end(trainer, module, out, None, 0)
    assert "train/answer_entropy" in logged_keys or "train/confidence_entropy" in logged_keys


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_equal_to_vocabulary_is_the_full_divergence(kind):
    full = _module(divergence=kind)
    vocab = full.student.get_output_embeddings().weight.shape[0]
    topk = _module(divergence=kind, topk=vocab)
    _assert_same(_step(full), _step(topk), 1e-5)
    small = _module(divergence=kind, topk=3)
    assert _step(small)[0] < _step(full)[0]  # a coarser support: a smaller divergence
    # the student's top-k (SDPO's verl code) is another support: another loss
    student_support = _module(divergence=kind, topk=3, topk_support="student")
    assert _step(student_support)[0] != _step(small)[0]


def test_fused_divergence_with_per_rollout_teacher_prompts_and_masked_rows():
    """SDPO's shape: B*K teacher prompts and rows left out; fused equals unfused."""
    unfused, fused = (
        _module(divergence="jsd", topk=5),
        _module(divergence="jsd", topk=5, fused=True),
    )
    tok = unfused.tokenizer
    prompts = [tok("ab")["input_ids"], tok("cde")["input_ids"]]
    teacher_prompts = [tok(t)["input_ids"] for t in ("x", "yy", "zzz", "w", "vv", "u")]
    completions = [tok(t)["input_ids"] for t in ("Answer: q", "A", "Conf", "kk", "Answer: l", "z")]
    rows = torch.tensor([True, False, True, True, False, True])
    results = []
    for module in (unfused, fused):
        module.student.zero_grad()
        out = _divergence(module, prompts, teacher_prompts, completions, rows)
        assert out.correction == {}  # no sampler log-probs: no importance weights
        out.loss.backward()
        assert not out.mask[~rows].any() and (out.per_token[~rows] == 0).all()
        results.append(
            (out.loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()})
        )
    _assert_same(*results, 1e-5)


def test_loss_options_refused_at_start_up():
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        _module(topk=100_000)
    with pytest.raises(ConfigError, match="is not chunked"):
        LossSettings(topk=5, chunk_size=8)
    with pytest.raises(ConfigError, match="fused='yes' is out of range: it must be true or false"):
        LossSettings(fused="yes")
    with pytest.raises(ValueError, match=r"topk_support='both' is out of range: it must be one of"):
        LossSettings(topk=3, topk_support="both")
    with pytest.raises(ValueError, match="plain torch.nn.Linear; it is Linear with a LoRA"):
        _module(lora=["q_proj", "lm_head"], fused=True)


def test_fused_with_lora_on_the_body_equals_unfused():
    """LoRA off the head: the teacher is the adapter-disabled student, its body run alone."""
    unfused = _module(lora=["q_proj", "v_proj"], divergence="jsd")
    fused = _module(lora=["q_proj", "v_proj"], divergence="jsd", fused=True)
    with torch.no_grad():  # a non-zero adapter, so that student and teacher differ
        for name, p in unfused.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fused.load_state_dict(unfused.state_dict())
    _assert_same(_step(unfused), _step(fused), 1e-5)


# --- method.loss.temperature: both models' logits divided by it, on every loss path ---------


def _by_hand(module, prompts, teacher_prompts, completions, temperature, topk=None):
    """Forward KL(teacher || student) of softmax(logits / temperature), written out."""
    pad, logits = module.tokenizer.pad_token_id, module.loss_path.logits
    with torch.no_grad():
        s, mask = logits(module.student, prompts, completions, pad)  # (N, T, V)
        t, _ = logits(module.teacher, teacher_prompts, completions, pad)
    s_lp = torch.log_softmax(s.float() / temperature, dim=-1)
    t_lp = torch.log_softmax(t.float() / temperature, dim=-1)
    if topk is not None:  # the teacher's top-k tokens and one bucket for the rest
        index = t_lp.topk(topk, dim=-1).indices  # (N, T, k)

        def coarse(lp):
            rest = lp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
            return torch.cat([lp.gather(-1, index), rest], dim=-1)  # (N, T, k + 1)

        s_lp, t_lp = coarse(s_lp), coarse(t_lp)
    per_token = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # (N, T)
    mask = mask.bool()
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1)
    return per_sequence[mask.any(-1)].mean()


@pytest.mark.parametrize(
    "path", [{}, {"topk": 7}, {"fused": True}, {"fused": True, "topk": 7}], ids=str
)
def test_loss_temperature_divides_both_models_logits(path):
    tok = build_char_tokenizer()
    prompts = [tok("ab")["input_ids"], tok("cde")["input_ids"]]
    teacher_prompts = [tok("xy")["input_ids"], tok("zzz")["input_ids"]]
    completions = [tok(t)["input_ids"] for t in ("Answer: q", "A", "Conf", "kk", "Answer: l", "z")]
    losses = {}
    for temperature in (1.0, 2.0):
        module = _module(**path, temperature=temperature)
        loss = _divergence(module, prompts, teacher_prompts, completions).loss.detach()
        topk = path.get("topk")
        hand = _by_hand(module, prompts, teacher_prompts, completions, temperature, topk)
        torch.testing.assert_close(loss, hand, atol=1e-5, rtol=1e-5)
        losses[temperature] = loss.item()
    assert abs(losses[2.0] - losses[1.0]) > 1e-3 * losses[1.0]


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, "hot"])
def test_loss_temperature_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"method\.loss\.temperature=.* is out of range"):
        LossSettings(temperature=value)


# --- method.targets.cut=first: completions capped at the rollout length in the step -------


@pytest.mark.parametrize("cut", ["last", "first"])
def test_training_completions_fit_the_rollout_length_with_cut_first(cut):
    module = _module(targets=CaOPD(cut=cut), rollout=RolloutSettings(3, max_new_tokens=6))
    torch.manual_seed(0)
    out = module.training_step(make_items(2, 0, "train", 0), 0)
    lengths = [len(c) for c in out["step"].completions]
    eos = module.tokenizer.eos_token_id
    assert all(c[-1] == eos for c in out["step"].completions)
    # six sampled tokens leave no room for the line: cut=first caps, cut=last (today's) does not
    assert (max(lengths) <= 6) == (cut == "first")


SDPO_FORMAT = (
    "{prompt}\nCorrect solution:\n\n{context}{note}\n\nCorrectly solve the original question."
)


@pytest.mark.parametrize("caopd", [False, True])
def test_sdpo_step_masks_rollouts_without_a_successful_sibling_and_counts_them(caopd):
    template = TeacherTemplate(source="sdpo_sibling", user_format=SDPO_FORMAT)
    module = _module(template=template, targets=CaOPD() if caopd else None)
    tok, batch = module.tokenizer, make_items(2, 0, "train", 0)
    right = f"<think>so</think>Answer: {batch[0]['answer']}\nConfidence: 0.5"
    texts = [right, "Answer: #", "Answer: #", "Answer: #", "Answer: #", "Answer: #"]
    roll = Rollouts([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts], texts, [False] * 6)
    correct, p_acc = module.verify(batch, texts)
    assert correct.tolist() == [True] + [False] * 5  # group 0: one success; group 1: none
    teacher = module.teacher_inputs(batch, texts, correct, p_acc)
    assert len(teacher.prompts) == 6 and teacher.rows.tolist() == [False, True, True] + [False] * 3
    student_prompts = module.student_prompts(batch)[1]
    confidence = "0.33" if caopd else "1.00"
    for i in (1, 2):  # the success is its siblings' context, thinking stripped
        text = tok.decode(teacher.prompts[i])
        assert (
            f"Correct solution:\n\nAnswer: {batch[0]['answer']}\nConfidence: {confidence}" in text
        )
        assert ("Empirical confidence: 0.33. Output it." in text) == caopd
        assert "<think>" not in text and text.endswith("original question.<|end|><|assistant|>")
    assert teacher.prompts[0] == student_prompts[0]  # masked: a placeholder without context
    assert teacher.prompts[3:] == [student_prompts[1]] * 3
    logged_stats = {}
    module.log_dict = lambda d, **kw: logged_stats.update(d)
    module.sample_rollouts = lambda prompts, seeds=None: roll
    out = module.training_step(batch, 0)
    assert logged_stats["train/sdpo_masked_frac"].item() == pytest.approx(4 / 6)
    assert logged_stats["train/no_correct_solution_frac"].item() == 0
    assert out["loss"].item() > 0 and out["loss"].requires_grad


def test_caopd_sdpo_note_only_rows_stay_in_the_loss_with_the_note_as_their_context():
    """``note_only_rows``: rollouts without a successful sibling train against the note alone."""
    template = TeacherTemplate(
        source="sdpo_sibling",
        user_format=SDPO_FORMAT,
        note_only_format="{prompt}{note}\n\nCorrectly solve the original question.",
    )
    module = _module(template=template, targets=CaOPD(note_only_rows=True))
    tok, batch = module.tokenizer, make_items(2, 0, "train", 0)
    texts = [f"Answer: {batch[0]['answer']}\nConfidence: 0.5", "Answer: #", "Answer: #"]
    texts += ["Answer: #"] * 3
    roll = Rollouts([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts], texts, [False] * 6)
    correct, p_acc = module.verify(batch, texts)
    teacher = module.teacher_inputs(batch, texts, correct, p_acc)
    assert teacher.rows.tolist() == [False, True, True] + [False] * 3  # a sibling as context
    assert teacher.note_rows.tolist() == [True, False, False] + [True] * 3
    assert teacher.in_loss.all()
    # the success itself, and a group without one
    for i, item, p in [(0, batch[0], "0.33"), (3, batch[1], "0.00")]:
        text = tok.decode(teacher.prompts[i])
        assert f"{item['messages'][-1]['content']}\nEmpirical confidence:" in text
        assert f"Empirical confidence: {p}. Output it.\n\nCorrectly solve" in text
        assert "Correct solution:" not in text
    logged_stats = {}
    module.log_dict = lambda d, **kw: logged_stats.update(d)
    module.sample_rollouts = lambda prompts, seeds=None: roll
    module.training_step(batch, 0)
    assert logged_stats["train/sdpo_masked_frac"].item() == 0
    with pytest.raises(ConfigError, match="add_note=true"):
        CaOPD(note_only_rows=True, add_note=False)


@pytest.mark.slow
def test_smollm2_two_steps_fused_give_the_losses_of_unfused(smollm2_cache, tmp_path):
    """SmolLM2-135M (V = 49,152, tied head) trained 2 steps on the toy task, fused and not.

    Each run is a fresh `train.py` process, so both start from the same state.
    """
    model_dir = smollm2_cache / "smollm2_135m"
    losses = {}
    for fused in ("false", "true"):
        out = tmp_path / f"fused_{fused}"
        overrides = [
            "experiment=toy",
            "method=opd",
            "model=smollm2_135m",
            f"model.path={model_dir}",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "data.num_train=8",
            "data.num_eval=2",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "method.rollout.num_rollouts=2",
            "method.rollout.max_new_tokens=12",
            "eval.max_new_tokens=4",
            "eval_before_training=false",
            f"method.loss.fused={fused}",
            "logger=csv",
            "callbacks=minimal",
            f"hydra.run.dir={out}",
        ]
        subprocess.run(
            [sys.executable, "train.py", *overrides], cwd=ROOT, env=subprocess_env(), check=True
        )
        losses[fused] = logged(out, "train/loss")
    assert len(losses["false"]) == 2 and all(v > 0 for v in losses["false"])
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)


@pytest.mark.slow
def test_smollm2_caopd_builds_its_arithmetic_base_on_first_use(smollm2_cache, tmp_path):
    """experiment=smollm2 method=caopd, shrunk: the base warm-up runs once, then CaOPD with LoRA."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(smollm2_cache / "smollm2_135m", cache / "smollm2_135m")
    overrides = [
        "experiment=smollm2",
        "method=caopd",
        f"paths.cache_dir={cache}",
        # the base's warm-up, shrunk (its paths.cache_dir is the run's, as configured)
        "+model.base.overrides.trainer.max_steps=2",
        "+model.base.overrides.data={dataset: {n: 24}, num_eval: 3, eval_batch_size: 3}",
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "data.num_train=4",
        "data.num_eval=3",
        "data.batch_size=1",
        "data.eval_batch_size=3",
        "method.rollout.num_rollouts=2",
        "eval.teacher_conditioned=false",
        "callbacks=minimal",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=subprocess_env(), check=True
    )
    base = cache / "smollm2_arith_base"
    warmup = json.loads((base.parent / "smollm2_arith_base.run" / "metrics.json").read_text())
    assert warmup["run"]["experiment"] == "smollm2_base" and warmup["n"] == 3
    assert (base / "config.json").is_file() and not (base / "adapter_config.json").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["method"] == "caopd" and metrics["initial"]["n"] == 3
    assert set(metrics["by_category"]) == {"add2", "add3", "add4"}
    assert metrics["n_parameters"] > 100_000_000  # SmolLM2 itself, not a toy
    assert logged(tmp_path / "run", "train/loss")  # one step trained


def test_sdpo_row_loss_equals_the_demo_path_when_the_sibling_states_the_demo():
    """Per rollout, SDPO's divergence is OPD's when the contexts agree (only the prompt moves)."""
    # the toy's context format, one per rollout
    demo, sdpo = _module(), _module(template=TeacherTemplate(source="sdpo_sibling"))
    tok, batch = demo.tokenizer, make_items(2, 0, "train", 0)
    texts = [f"Answer: {it['answer']}\nConfidence: 0.{i + 3}" for it in batch for i in range(3)]
    roll = Rollouts([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts], texts, [False] * 6)
    correct, p_acc = demo.verify(batch, texts)
    assert correct.all() and all(it["demo"] == f"Answer: {it['answer']}" for it in batch)
    _, prompts, _ = demo.student_prompts(batch)
    per_token = []
    for module in (demo, sdpo):
        teacher = module.teacher_inputs(batch, texts, correct, p_acc)
        assert len(teacher.prompts) == (2 if module is demo else 6)
        out = _divergence(module, prompts, teacher.prompts, roll.completions)
        per_token.append(out.per_token)
    assert per_token[0].sum() > 0
    torch.testing.assert_close(per_token[0], per_token[1], atol=1e-5, rtol=1e-5)


# --- the teacher side: eval.teacher_conditioned and the teacher's own samples ---------------

TEACHER_BLOCK = {
    "n",
    "accuracy",
    "format_rate",
    "mean_confidence",
    "confidence_entropy",
    "answer_entropy",
    "student_accuracy",
    "student_confidence_entropy",
    "optimism_gap",
    "entropy_gap",
}


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else pytest.approx(a - b)


def test_teacher_conditioned_block_leaves_training_and_student_scores_alone(
    toy_base, tiny_overrides, make_cfg, tmp_path
):
    written = {}
    for switch in ("true", "false"):
        out = tmp_path / switch
        overrides = [
            "experiment=toy",
            "method=caopd",
            f"model.path={toy_base}",
            *tiny_overrides,
            f"eval.teacher_conditioned={switch}",
        ]
        run(make_cfg(overrides, out))
        written[switch] = json.loads((out / "metrics.json").read_text())
    on, off = written["true"], written["false"]
    for result in (on, on["initial"]):
        block = result["teacher_conditioned"]
        assert set(block) == TEACHER_BLOCK and block["n"] == result["n"] == 24
        assert block["student_accuracy"] == result["accuracy"]
        assert block["student_confidence_entropy"] == result["confidence_entropy"]
        assert block["optimism_gap"] == _gap(block["accuracy"], result["accuracy"])
        assert block["entropy_gap"] == _gap(
            block["confidence_entropy"], result["confidence_entropy"]
        )
    assert "teacher_conditioned" not in off and "teacher_conditioned" not in off["initial"]
    # the switch adds a block and nothing else: the same training, the same student scores
    on.pop("teacher_conditioned"), on["initial"].pop("teacher_conditioned")
    assert on == off
    assert logged(tmp_path / "true", "train/loss") == logged(tmp_path / "false", "train/loss")
    assert logged(tmp_path / "true", "val/teacher_conditioned/n") == [24.0, 24.0]
    assert logged(tmp_path / "false", "val/teacher_conditioned/n") == []
    from lightning_caopd.models import load_pretrained

    n = sum(p.numel() for p in load_pretrained(str(toy_base)).parameters())
    assert on["n_parameters"] == on["initial"]["n_parameters"] == n


@pytest.mark.parametrize("source", ["demo", "correct_solution", "sdpo_sibling"])
def test_teacher_is_evaluated_on_the_demonstration_without_caopd_note(source):
    # CaOPD's targets: OPD's at evaluation all the same (no note, no replaced confidence)
    module = _module(template=TeacherTemplate(source, user_format=SDPO_FORMAT), targets=CaOPD())
    items = make_items(3, 0, "eval", 0)
    module.eval()
    teacher, student = module.evaluate_teacher(items), module.score(module.student, items)
    for item, t, s in zip(items, teacher.records, student.records, strict=True):
        context = f"Correct solution:\n\n{item['demo']}\nConfidence: 1.00\n\n"
        question = module.task.student_messages(item)[-1]["content"]
        turn = f"<|user|>{question}\n{context}Correctly solve the original question.<|end|>"
        assert turn in t["prompt"] and "Empirical confidence" not in t["prompt"]
        assert "Correct solution" not in s["prompt"] and f"<|user|>{question}<|end|>" in s["prompt"]
    # greedy: the same answers twice
    assert [r["completion"] for r in module.evaluate_teacher(items).records] == [
        r["completion"] for r in teacher.records
    ]


def test_teacher_evaluation_and_samples_leave_the_random_state_alone():
    module = _module()
    module.eval_cfg.do_sample = True  # a sampled evaluation draws random numbers
    items = make_items(2, 0, "eval", 0)
    prompts = module.student_prompts(items)[1]
    for call in (lambda: module.evaluate_teacher(items), lambda: module.sample_teacher(prompts)):
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        call()
        torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)


def test_teacher_samples_k_per_group_prompt_and_one_per_rollout_prompt():
    module = _module()  # K = 3
    batch = make_items(2, 0, "train", 0)
    torch.manual_seed(0)
    group = module.training_step(batch, 0)["step"]
    assert len(group.teacher_prompts) == 2 and group.teacher_rows.tolist() == [True] * 6
    assert len(module.sample_teacher(group.teacher_prompts).texts) == 6
    module = _module(template=TeacherTemplate(source="sdpo_sibling"))
    per_rollout = [group.teacher_prompts[b] for b in (0, 0, 0, 1, 1, 1)]
    assert len(module.sample_teacher(per_rollout).texts) == 6


def test_teacher_conditioned_switch_is_checked_at_start_up():
    with pytest.raises(ConfigError, match=r"eval.teacher_conditioned='yes' is out of range"):
        DistillationModule(
            student=build_tiny_llama(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
            tokenizer=build_char_tokenizer(),
            task=ToyTask(),
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
            template=TeacherTemplate(),
            eval={"teacher_conditioned": "yes"},
        )


def test_lora_teacher_is_evaluated_with_the_adapter_off():
    module = _module(lora=["q_proj", "v_proj"])
    with torch.no_grad():  # a non-zero adapter, so that student and teacher differ
        for name, p in module.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    items = make_items(3, 0, "eval", 0)
    chats = [module.teacher_chat(it) for it in items]
    module.eval()
    teacher = module.evaluate_teacher(items)
    with module.student.disable_adapter():
        base = module.score(module.student, items, chats)
    adapted = module.score(module.student, items, chats)
    assert teacher.answer_entropy == base.answer_entropy != adapted.answer_entropy
    assert len(module.sample_teacher(module.student_prompts(items)[1]).texts) == 9
