"""Sampling masks, sequence assembly, EMA and the toy world."""

import pytest
import torch

from lightning_caopd.models import build_char_tokenizer, build_tiny_llama
from lightning_caopd.callbacks import ema_update
from lightning_caopd.rollout import build_batch, completion_logits, completion_mask, sample
from lightning_caopd.tasks import toy


def test_completion_mask_stops_after_first_stop_token():
    tokens = torch.tensor([[5, 6, 9, 7, 9, 9], [5, 5, 5, 5, 5, 5]])
    m = completion_mask(tokens, [9])
    assert m.tolist() == [[True, True, True, False, False, False], [True] * 6]


def test_build_batch_completion_logits_match_unpadded_forward():
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=1).eval()
    prompts, comps = [[10, 11, 12], [13]], [[20, 21], [22, 23, 24]]
    batch = build_batch(prompts, comps, pad_id=0)
    logits = completion_logits(model, batch)  # (2, 3, V)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        full = model(input_ids=torch.tensor([p + c])).logits[0]
        torch.testing.assert_close(logits[i, : len(c)], full[len(p) - 1 : len(p) + len(c) - 1], atol=1e-5, rtol=1e-5)


def test_sample_returns_k_rows_per_prompt_ending_at_eos_or_limit():
    tok = build_char_tokenizer()
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    r = sample(model, tok, [[3, 20, 21], [3, 22]], num_samples=3, max_new_tokens=5)
    assert len(r.completions) == 6
    for comp, trunc in zip(r.completions, r.truncated):
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
        r = sample(model, tok, prompts, num_samples=4, max_new_tokens=12, use_generate=use_generate, **options)
        runs.append((r.completions, r.truncated, torch.get_rng_state()))
    (a, ta, ga), (b, tb, gb) = runs
    assert a == b and ta == tb and torch.equal(ga, gb)
    assert len({tuple(c) for c in a}) > 1  # not a degenerate case: the rows differ


def test_ema_update_moves_teacher_toward_student():
    s, t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = t.weight.detach().clone()
    ema_update(t, s, 0.25)
    torch.testing.assert_close(t.weight, 0.75 * before + 0.25 * s.weight.detach())
    ema_update(t, s, 1.0)
    torch.testing.assert_close(t.weight, s.weight)


def test_toy_items_are_seeded_and_verified():
    a, b = toy.make_items(30, seed=3, split="eval"), toy.make_items(30, seed=3, split="eval")
    assert a == b and a != toy.make_items(30, seed=4, split="eval")
    assert {it["category"] for it in a} == set(toy.FAMILIES)
    for it in a:
        assert toy.verify(f"{it['demo']}\nConfidence: 0.5", it["answer"])
        assert not toy.verify("Answer: ?\nConfidence: 0.5", it["answer"])
    train_codes = {it["messages"][0]["content"] for it in toy.make_items(3000, 0, "train") if it["category"] == "code"}
    eval_codes = {it["messages"][0]["content"] for it in a if it["category"] == "code"}
    assert not train_codes & eval_codes


def test_shared_prefix_equals_unshared_loss_and_gradients():
    from lightning_caopd.divergence import divergence_loss
    from lightning_caopd.rollout import shared_prefix_logits

    torch.manual_seed(0)
    model = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=2)
    teacher = build_tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, seed=3)
    prompts = [[10, 11, 12, 13], [14, 15]]
    comps = [[20, 21, 5], [22], [23, 24, 25, 26], [27, 28]]  # K = 2, ragged
    with torch.no_grad():
        t_logits = completion_logits(teacher, build_batch([p for p in prompts for _ in range(2)], comps, 0))
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
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
