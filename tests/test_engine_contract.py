"""The sampling contract every rollout engine keeps, run against ``hf`` and the real vLLM (CPU).

K completions per prompt, prompt-major; each completion up to and including the first of the
model's end ids (every id of its generation config, not only the tokenizer's EOS); ``truncated``
exactly when the length limit came first; temperature 0 is greedy; the texts decode the ids.
"""

from __future__ import annotations

import pytest
import torch

from lightning_caopd.models import build_char_tokenizer
from lightning_caopd.rollout import encode_chats, end_ids
from tests.fixtures.engines import attached, engine_llama, make_engine, plant_first_token

ENGINES = ["hf", "vllm"]
TOK = build_char_tokenizer()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    """One engine per kind for the module (vLLM starts once; syncs switch the weights)."""
    return make_engine(request.param)


def _prompts(*questions: str) -> list[list[int]]:
    ids, _ = encode_chats(TOK, [[{"role": "user", "content": q}] for q in questions])
    return ids


def test_greedy_rows_are_prompt_major_and_equal_generate(engine):
    model = engine_llama(seed=1)
    model.generation_config.eos_token_id = [TOK.eos_token_id]
    attached(engine, model, TOK)
    prompts = _prompts("next k", "prev q!", "code 4821")
    got = engine.sample(prompts, 2, 6, 0.0, 1.0)
    assert len(got.completions) == len(got.texts) == len(got.truncated) == 6
    model.eval()
    for b, prompt in enumerate(prompts):
        want = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=TOK.pad_token_id
        )[0, len(prompt) :].tolist()
        assert got.completions[2 * b] == got.completions[2 * b + 1] == want
    assert len({tuple(c) for c in got.completions}) == 3  # three prompts, three answers
    assert got.texts[0] == TOK.decode(got.completions[0], skip_special_tokens=True)


def test_sampled_rows_stop_at_the_limit_and_are_flagged_truncated(engine):
    model = engine_llama(seed=2)
    model.generation_config.eos_token_id = [TOK.eos_token_id]
    attached(engine, model, TOK)
    torch.manual_seed(0)
    got = engine.sample(_prompts("next k", "prev q"), 4, 3, 1.0, 1.0)
    assert len(got.completions) == 8
    for ids, cut in zip(got.completions, got.truncated, strict=True):
        ends = bool(ids) and ids[-1] == TOK.eos_token_id
        assert 1 <= len(ids) <= 3 and cut == (not ends) and (cut == (len(ids) == 3) or ends)
    assert sum(got.truncated) >= 6  # a random model rarely draws the 1-in-102 EOS


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_end_id_of_the_generation_config_ends_a_completion(engine, temperature):
    """A model whose first token is its second end id (not the tokenizer's EOS) stops there."""
    model = engine_llama(seed=3)
    other_end = TOK.convert_tokens_to_ids("<|system|>")  # an end id that is not EOS
    model.generation_config.eos_token_id = [TOK.eos_token_id, other_end]
    plant_first_token(model, TOK.convert_tokens_to_ids("<|assistant|>"), other_end)
    assert end_ids(model, TOK) == [TOK.eos_token_id, other_end]
    attached(engine, model, TOK)
    got = engine.sample(_prompts("next k", "prev q"), 3, 8, temperature, 1.0)
    assert got.completions == [[other_end]] * 6 and got.truncated == [False] * 6
    assert got.texts == [""] * 6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_completion_ends_before_min_new_tokens(engine, temperature):
    # method.rollout.min_new_tokens: a model that would end at once is held to 3 tokens first
    model = engine_llama(seed=3)
    other_end = TOK.convert_tokens_to_ids("<|system|>")
    model.generation_config.eos_token_id = [TOK.eos_token_id, other_end]
    plant_first_token(model, TOK.convert_tokens_to_ids("<|assistant|>"), other_end)
    attached(engine, model, TOK)
    torch.manual_seed(0)
    got = engine.sample(_prompts("next k", "prev q"), 3, 8, temperature, 1.0, min_new_tokens=3)
    ends = {TOK.eos_token_id, other_end}
    assert len(got.completions) == 6
    for ids, cut in zip(got.completions, got.truncated, strict=True):
        assert len(ids) >= 4 and not ends & set(ids[:3])
        assert cut == (ids[-1] not in ends) and (cut == (len(ids) == 8))


def test_seeded_prompts_draw_the_same_whatever_else_is_in_the_call(engine):
    # method.rollout.row_seeds: N processes sampling their share of a batch draw what one
    # process sampling the whole batch draws
    model = engine_llama(seed=5)
    attached(engine, model, TOK)
    prompts, seeds = _prompts("next k", "prev q", "code 4821"), [7, 8, 9]
    torch.manual_seed(0)
    together = engine.sample(prompts, 4, 6, 1.0, 1.0, seeds).completions
    torch.manual_seed(1)  # torch's own generator plays no part
    first = engine.sample(prompts[:1], 4, 6, 1.0, 1.0, seeds[:1]).completions
    rest = engine.sample(prompts[1:], 4, 6, 1.0, 1.0, seeds[1:]).completions
    assert together == first + rest
    assert len({tuple(c) for c in together}) > 3  # sampled: the rows differ


def test_only_an_engine_with_its_own_weights_reports_log_probs(engine):
    model = engine_llama(seed=4)
    attached(engine, model, TOK)
    torch.manual_seed(0)
    got = engine.sample(_prompts("next k"), 2, 5, 1.0, 1.0)
    if engine.correction_cap is None:  # hf: on-policy by construction
        assert got.logprobs is None
    else:
        assert [len(lp) for lp in got.logprobs] == [len(c) for c in got.completions]
