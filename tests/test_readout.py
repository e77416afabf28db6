"""The expected-confidence readout (`lightning_caopd.readout`)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_caopd.errors import ConfigError
from lightning_caopd.readout import GRID, expected_confidences
from lightning_caopd.rollout import encode_chats
from lightning_caopd.settings import EvalSettings
from lightning_caopd.tasks.toy import ToyTask, make_items
from tests.fixtures.tiny_models import save_tiny_hf_model


def _whole_sequence_mean(model, prompt, completion, first, lead, tokenizer):
    """The readout by brute force: each grid value's whole sequence scored without a cache."""
    scores = []
    for v in GRID:
        cand = tokenizer.encode(f"{lead}{v:.2f}", add_special_tokens=False)
        ids = torch.tensor([prompt + completion[:first] + cand])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        start = ids.shape[1] - len(cand)
        scores.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(cand)))
    weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
    return float((weights * torch.tensor(GRID, dtype=torch.float64)).sum()), sum(
        math.exp(s) for s in scores
    )


@pytest.mark.parametrize("joined", [False, True], ids=["digit-tokens", "space-joined-digit"])
def test_expected_confidence_is_the_grid_mean_of_each_values_sequence_probability(joined, tmp_path):
    # joined: the tokenizer has " 0" and " 1" tokens (as SentencePiece's "▁0"), so the
    # literal's first token starts with the space, and each grid value is scored after it
    path = save_tiny_hf_model(tmp_path / "m", extra_tokens=(" 0", " 1") if joined else ())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    items = make_items(3, 0, "eval")
    prompts, _ = encode_chats(tok, [ToyTask().student_messages(it) for it in items])
    texts = ["Answer: b\nConfidence: 0.62", "Answer: q", "x\nConfidence: 1.00 done"]
    completions = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    assert (tok.decode(completions[0][21:22]) == " 0") == joined  # the tokenization tested
    expected, mass = expected_confidences(model, tok, prompts, completions, texts)
    assert math.isnan(expected[1]) and math.isnan(mass[1])  # no confidence stated
    lead = " " if joined else ""
    for i, head in ((0, "Answer: b\nConfidence: "), (2, "x\nConfidence: ")):
        first = len(head) - len(lead)  # character tokens up to the literal (or its " 0")
        want, want_mass = _whole_sequence_mean(model, prompts[i], completions[i], first, lead, tok)
        assert expected[i].item() == pytest.approx(want, abs=1e-6)
        assert mass[i].item() == pytest.approx(want_mass, rel=1e-4)
    assert 0 < expected[0] < 1 and expected[0] != expected[2]  # a random model is unsure


def test_readout_settings_are_checked():
    EvalSettings(confidence_readout="greedy", scoring="reference")
    EvalSettings(confidence_readout="expected")
    with pytest.raises(ConfigError, match="eval.confidence_readout='mode' is out of range"):
        EvalSettings(confidence_readout="mode")
    with pytest.raises(ConfigError, match="eval.scoring=default"):
        EvalSettings(confidence_readout="expected", scoring="reference")


def test_evaluation_states_the_expected_confidence_and_keeps_the_written_one(tiny_dir, monkeypatch):
    from lightning_caopd import scoring
    from lightning_caopd.rollout import Rollouts

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    items = make_items(2, 0, "eval")
    texts = [f"Answer: {items[0]['answer']}\nConfidence: 0.90", "Answer: ?"]
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    # the model's answers, fixed: a random tiny model never writes a confidence line
    monkeypatch.setattr(scoring, "sample", lambda *a, **k: Rollouts(ids, texts, [False, False]))
    greedy, expected = (
        scoring.evaluate_items(model, tok, ToyTask(), items, confidence_readout=r)
        for r in ("greedy", "expected")
    )
    assert torch.equal(greedy.correct, expected.correct) and bool(expected.correct[0])
    assert greedy.confidence[0].item() == pytest.approx(0.9)
    assert expected.confidence[0].item() != pytest.approx(0.9)  # the random model's mean
    assert math.isnan(expected.confidence[1])
    rec = expected.records[0]
    assert rec["confidence_greedy"] == pytest.approx(0.9) and rec["confidence"] != 0.9
    assert 0 < rec["confidence_grid_mass"] <= 1 and "confidence_greedy" not in greedy.records[0]
