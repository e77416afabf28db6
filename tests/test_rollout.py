"""Rollouts (`lightning_caopd.rollout`): encoding, sampling, masks, batches, shared prefixes."""

import pytest
import torch

from lightning_caopd.errors import ConfigError
from lightning_caopd.models import build_char_tokenizer, build_tiny_llama
from lightning_caopd.rollout import (
    build_batch,
    completion_logits,
    completion_mask,
    encode_chats,
    row_generators,
    sample,
    seeded_draw,
)
from tests.fixtures.engines import plant_first_token


def test_completion_mask_stops_after_first_stop_token():
    tokens = torch.tensor([[5, 6, 9, 7, 9, 9], [5, 5, 5, 5, 5, 5]])
    m = completion_mask(tokens, [9])
    assert m.tolist() == [[True, True, True, False, False, False], [True] * 6]


def test_build_batch_completion_logits_match_unpadded_forward():
    model = build_tiny_llama(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=1
    ).eval()
    prompts, comps = [[10, 11, 12], [13]], [[20, 21], [22, 23, 24]]
    batch = build_batch(prompts, comps, pad_id=0)
    logits = completion_logits(model, batch)  # (2, 3, V)
    for i, (p, c) in enumerate(zip(prompts, comps, strict=False)):
        full = model(input_ids=torch.tensor([p + c])).logits[0]
        torch.testing.assert_close(
            logits[i, : len(c)], full[len(p) - 1 : len(p) + len(c) - 1], atol=1e-5, rtol=1e-5
        )


def test_sample_returns_k_rows_per_prompt_ending_at_eos_or_limit():
    tok = build_char_tokenizer()
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    r = sample(model, tok, [[3, 20, 21], [3, 22]], num_samples=3, max_new_tokens=5)
    assert len(r.completions) == 6
    for comp, trunc in zip(r.completions, r.truncated, strict=False):
        assert len(comp) <= 5
        assert trunc == (comp[-1:] != [tok.eos_token_id])
        assert tok.eos_token_id not in comp[:-1]


@pytest.mark.parametrize(
    "options", [{"do_sample": False}, {}, {"temperature": 0.7}, {"top_p": 0.8}], ids=str
)
def test_decode_loop_draws_the_tokens_generate_draws(options):
    # the lean loop must be a drop-in for generate: same tokens and the same generator state
    # after, so runs are unchanged by which one samples
    tok = build_char_tokenizer()
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=2)
    prompts = [[3, 20, 21, 22], [3, 22], [3, 30, 31]]  # ragged: left padding
    runs = []
    for use_generate in (True, False):
        torch.manual_seed(0)
        r = sample(
            model,
            tok,
            prompts,
            num_samples=4,
            max_new_tokens=12,
            use_generate=use_generate,
            **options,
        )
        runs.append((r.completions, r.truncated, torch.get_rng_state()))
    (a, ta, ga), (b, tb, gb) = runs
    assert a == b and ta == tb and torch.equal(ga, gb)
    assert len({tuple(c) for c in a}) > 1  # not a degenerate case: the rows differ


def test_min_new_tokens_holds_the_end_back_as_generate_does():
    # a model whose first answer is EOS: min_new_tokens=4 keeps every row going for 4 tokens,
    # the lean loop drawing what generate's MinNewTokensLengthLogitsProcessor draws
    tok = build_char_tokenizer()
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=2)
    with torch.no_grad():
        plant_first_token(model, 21, tok.eos_token_id)
    prompts = [[3, 20, 21], [3, 21]]
    assert sample(model, tok, prompts, 3, 10).completions == [[tok.eos_token_id]] * 6
    runs = []
    for use_generate in (True, False):
        torch.manual_seed(0)
        r = sample(model, tok, prompts, 3, 10, use_generate=use_generate, min_new_tokens=4)
        runs.append((r.completions, r.truncated))
    assert runs[0] == runs[1]
    for comp, cut in zip(*runs[1], strict=True):
        assert len(comp) >= 5 and tok.eos_token_id not in comp[:4]
        assert cut == (comp[-1] != tok.eos_token_id)


def test_seeded_rows_are_drawn_the_same_whatever_else_is_in_the_batch():
    # method.rollout.row_seeds: what N processes draw for their prompts is what one process
    # draws for all of them (trainer=ddp|fsdp against one process)
    tok = build_char_tokenizer()
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=2)
    prompts, seeds = [[3, 20, 21, 22], [3, 22], [3, 30, 31]], [11, 12, 13]
    options = {"num_samples": 4, "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95}
    torch.manual_seed(0)
    together = sample(model, tok, prompts, seeds=seeds, **options).completions
    torch.manual_seed(1)  # torch's own generator plays no part
    first = sample(model, tok, prompts[:1], seeds=seeds[:1], **options).completions
    rest = sample(model, tok, prompts[1:], seeds=seeds[1:], **options).completions
    assert together == first + rest
    assert len({tuple(c) for c in together}) > 4  # the K rows of a prompt differ
    other = sample(model, tok, prompts[:1], seeds=[99], **options).completions
    assert other != first  # the seed decides


def test_seeded_draw_follows_the_distribution():
    # the argmax of p / Exp(1) noise is a draw from p (multinomial's own one-sample method)
    probs = torch.tensor([[0.7, 0.2, 0.1]]).expand(4000, 3)
    gens = row_generators(list(range(1000)), 4)
    counts = torch.bincount(seeded_draw(probs, gens), minlength=3) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_shared_prefix_equals_unshared_loss_and_gradients():
    from lightning_caopd.divergence import divergence_loss
    from lightning_caopd.rollout import shared_prefix_logits

    torch.manual_seed(0)
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=2)
    teacher = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=3)
    prompts = [[10, 11, 12, 13], [14, 15]]
    comps = [[20, 21, 5], [22], [23, 24, 25, 26], [27, 28]]  # K = 2, ragged
    with torch.no_grad():
        t_logits = completion_logits(
            teacher, build_batch([p for p in prompts for _ in range(2)], comps, 0)
        )
    grads = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            s_logits, mask = shared_prefix_logits(model, prompts, comps, 0)
        else:
            batch = build_batch([p for p in prompts for _ in range(2)], comps, 0)
            s_logits, mask = completion_logits(model, batch), batch["completion_mask"]
        loss, _ = divergence_loss(s_logits, t_logits, mask)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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
    with pytest.raises(ConfigError, match="prompt_overflow='drop' is out of range"):
        encode_chats(tok, chats, limit, "drop")


def test_chat_template_kwargs_reach_the_template(tiny_dir):
    from lightning_caopd.models import load_tokenizer
    from lightning_caopd.rollout import encode_chats

    tok = load_tokenizer(str(tiny_dir))
    tok.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}x{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    chats = [[{"role": "user", "content": "ab"}]]
    plain, _ = encode_chats(tok, chats)
    off, _ = encode_chats(tok, chats, chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(plain[0]) == "ab" and tok.decode(off[0]) == "xab"
