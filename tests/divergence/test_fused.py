"""Fused linear divergence against materialised logits -> divergence_loss / topk_tail_loss."""

import pytest
import torch
from torch import nn

from lightning_caopd.divergence import (
    OutputHead,
    divergence_loss,
    fused_linear_divergence,
    skip_first_tokens,
    topk_tail_loss,
)

B, T, H, H_TEACHER, V = 3, 7, 6, 5, 23

# (kind, beta, topk): every divergence, full vocabulary and top-k + tail (k < V and k = V).
CASES = [
    ("forward_kl", 0.5, None),
    ("reverse_kl", 0.5, None),
    ("jsd", 0.3, None),
    ("jsd", 1.0, None),
    ("forward_kl", 0.5, 4),
    ("reverse_kl", 0.5, 4),
    ("jsd", 0.5, 4),
    ("jsd", 0.0, V),
]


def _randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _mask():
    """(B + 1, T) mask with a left offset, a short row and an empty row; 12 counted
    positions after skipping the first 2 of each row, so chunk 4 divides K and 5 does not."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1:] = True  # 6 -> 4 after the skip
    mask[1, :] = True  # 7 -> 5
    mask[2, 2:7] = True  # 5 -> 3
    extra = torch.zeros(1, T, dtype=torch.bool)  # an empty row
    mask = torch.cat([mask, extra])
    return skip_first_tokens(mask, 2)


def _reference(s_hidden, s_head, t_hidden, t_head, mask, kind, beta, temperature, topk):
    s_logits = s_head.logits(s_hidden)  # (B, T, V)
    with torch.no_grad():
        t_logits = t_head.logits(t_hidden)
    if topk is None:
        return divergence_loss(
            s_logits, t_logits, mask, kind=kind, beta=beta, temperature=temperature
        )
    return topk_tail_loss(
        s_logits, t_logits, mask, k=topk, kind=kind, beta=beta, temperature=temperature
    )


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind,beta,topk", CASES)
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
@pytest.mark.parametrize("head_kind", ["plain", "bias_scale_softcap"])
def test_fused_equals_unfused(kind, beta, topk, chunk_size, head_kind):
    mask = _mask()
    assert mask.sum() == 12
    s_hidden = _randn(B + 1, T, H, seed=1).requires_grad_(True)
    t_hidden = _randn(B + 1, T, H_TEACHER, seed=2)
    s_weight = _randn(V, H, seed=3).requires_grad_(True)
    t_weight = _randn(V, H_TEACHER, seed=4)
    if head_kind == "plain":
        s_head, t_head = OutputHead(s_weight), OutputHead(t_weight)
        inputs = (s_hidden, s_weight)
    else:
        s_bias = _randn(V, seed=5).requires_grad_(True)
        s_head = OutputHead(s_weight, s_bias, logit_scale=1.7, softcap=3.0)
        t_head = OutputHead(t_weight, _randn(V, seed=6), logit_scale=0.8, softcap=2.5)
        inputs = (s_hidden, s_weight, s_bias)
    temperature = 0.9

    loss, per_token = fused_linear_divergence(
        s_hidden,
        s_head,
        t_hidden,
        t_head,
        mask,
        kind=kind,
        beta=beta,
        temperature=temperature,
        topk=topk,
        chunk_size=chunk_size,
    )
    want_loss, want_tok = _reference(
        s_hidden, s_head, t_hidden, t_head, mask, kind, beta, temperature, topk
    )
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token, want_tok.detach(), atol=1e-5, rtol=0)
    got, want = _grads(loss, inputs), _grads(want_loss, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert g.abs().sum() > 0
    assert got[0][~mask].eq(0).all()  # masked positions get no gradient
    assert not per_token.requires_grad and per_token[~mask].eq(0).all()


class _TinyTiedLM(nn.Module):
    """Embedding -> one nonlinear layer -> head tied to the embedding, like a tied HF LM."""

    def __init__(self, seed):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        with torch.no_grad():
            self.embed.weight.copy_(_randn(V, H, seed=seed))
            self.mix.weight.copy_(_randn(H, H, seed=seed + 1, scale=0.5))
            self.mix.bias.copy_(_randn(H, seed=seed + 2))

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids)))  # (B, T, H)


@pytest.mark.parametrize("kind,beta,topk", CASES)
@pytest.mark.parametrize("chunk_size", [4, 5])
def test_tied_embeddings_gradient_flows_into_the_shared_parameter(kind, beta, topk, chunk_size):
    model = _TinyTiedLM(seed=7)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, V, (B + 1, T), generator=g)
    teacher_ids = torch.randint(0, V, (B + 1, T), generator=g)
    mask = _mask()
    head = OutputHead(model.embed.weight)
    with torch.no_grad():  # self-distillation: the same weights read a different context
        t_hidden = model.hidden(teacher_ids)

    def grads(fused):
        model.zero_grad(set_to_none=True)
        s_hidden = model.hidden(ids)
        if fused:
            loss, _ = fused_linear_divergence(
                s_hidden, head, t_hidden, head, mask,
                kind=kind, beta=beta, topk=topk, chunk_size=chunk_size,
            )  # fmt: skip
        else:
            loss, _ = _reference(s_hidden, head, t_hidden, head, mask, kind, beta, 1.0, topk)
        loss.backward()
        return loss.detach(), model.embed.weight.grad.clone(), model.mix.weight.grad.clone()

    got, want = grads(True), grads(False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The head's share is really there: without it the embedding gradient differs.
    model.zero_grad(set_to_none=True)
    loss, _ = fused_linear_divergence(
        model.hidden(ids), OutputHead(model.embed.weight.detach()), t_hidden, head, mask,
        kind=kind, beta=beta, topk=topk, chunk_size=chunk_size,
    )  # fmt: skip
    loss.backward()
    assert (model.embed.weight.grad - got[1]).abs().max() > 1e-4


def test_teacher_side_gets_no_gradient():
    mask = _mask()
    s_hidden = _randn(B + 1, T, H, seed=9).requires_grad_(True)
    t_hidden = _randn(B + 1, T, H_TEACHER, seed=10).requires_grad_(True)
    s_weight = _randn(V, H, seed=11).requires_grad_(True)
    t_weight = _randn(V, H_TEACHER, seed=12).requires_grad_(True)
    t_bias = _randn(V, seed=13).requires_grad_(True)
    loss, _ = fused_linear_divergence(
        s_hidden, s_weight, t_hidden, OutputHead(t_weight, t_bias), mask, kind="jsd"
    )
    loss.backward()
    assert t_hidden.grad is None and t_weight.grad is None and t_bias.grad is None
    assert s_hidden.grad.abs().sum() > 0 and s_weight.grad.abs().sum() > 0


def test_flat_inputs_are_one_sequence():
    s_hidden = _randn(2, 5, H, seed=14)
    t_hidden = _randn(2, 5, H, seed=15)
    weight = _randn(V, H, seed=16)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    flat_s, flat_t = s_hidden[mask].requires_grad_(True), t_hidden[mask]  # (7, H)
    loss, per_token = fused_linear_divergence(flat_s, weight, flat_t, weight, chunk_size=3)
    assert per_token.shape == (7,)
    # One sequence: the plain mean over its 7 positions (not a mean of two row means).
    want, want_tok = divergence_loss(
        flat_s[None] @ weight.T, flat_t[None] @ weight.T, torch.ones(1, 7, dtype=torch.bool)
    )
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_token, want_tok[0].detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_token.mean(), loss)
    two_rows, _ = fused_linear_divergence(s_hidden, weight, t_hidden, weight, mask)
    assert (two_rows - loss).abs() > 1e-4  # on this data the two reductions really differ


def test_empty_mask_and_no_grad_mode():
    s_hidden = _randn(2, 3, H, seed=17).requires_grad_(True)
    weight = _randn(V, H, seed=18).requires_grad_(True)
    t_hidden = _randn(2, 3, H, seed=19)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss, per_token = fused_linear_divergence(s_hidden, weight, t_hidden, weight.detach(), empty)
    assert loss.item() == 0.0 and per_token.eq(0).all()
    loss.backward()
    assert s_hidden.grad.eq(0).all() and weight.grad.eq(0).all()

    with torch.no_grad():
        loss_ng, tok_ng = fused_linear_divergence(s_hidden, weight, t_hidden, weight, None)
    loss_g, tok_g = fused_linear_divergence(s_hidden, weight, t_hidden, weight, None)
    assert not loss_ng.requires_grad and loss_g.requires_grad
    torch.testing.assert_close(loss_ng, loss_g.detach())
    torch.testing.assert_close(tok_ng, tok_g)


@pytest.mark.parametrize("kind,beta,topk", [("forward_kl", 0.5, None), ("jsd", 0.3, 3)])
def test_gradcheck_float64(kind, beta, topk):
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    s_hidden = _randn(2, 4, 3, seed=20, dtype=torch.float64).requires_grad_(True)
    weight = _randn(7, 3, seed=21, dtype=torch.float64).requires_grad_(True)
    bias = _randn(7, seed=22, dtype=torch.float64).requires_grad_(True)
    t_hidden = _randn(2, 4, 3, seed=23, dtype=torch.float64)
    t_weight = _randn(7, 3, seed=24, dtype=torch.float64)

    def fn(h, w, b):
        head = OutputHead(w, b, logit_scale=1.2, softcap=2.0)
        return fused_linear_divergence(
            h, head, t_hidden, t_weight, mask,
            kind=kind, beta=beta, topk=topk, temperature=1.3, chunk_size=2,
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, (s_hidden, weight, bias))


def test_bfloat16_close_to_unfused():
    mask = _mask()
    s_hidden = _randn(B + 1, T, H, seed=25).bfloat16().requires_grad_(True)
    weight = _randn(V, H, seed=26).bfloat16().requires_grad_(True)
    t_hidden = _randn(B + 1, T, H, seed=27).bfloat16()
    loss, per_token = fused_linear_divergence(
        s_hidden, weight, t_hidden, weight, mask, chunk_size=5
    )
    assert loss.dtype == per_token.dtype == torch.float32
    want, _ = divergence_loss(s_hidden @ weight.T, (t_hidden @ weight.T).detach(), mask)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    got_g, want_g = _grads(loss, (s_hidden, weight)), _grads(want, (s_hidden, weight))
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def _llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, final_logit_softcapping=0.05,
    )  # fmt: skip
    return Gemma2ForCausalLM(cfg)


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(
        vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0,
    )  # fmt: skip
    return GraniteForCausalLM(cfg)


@pytest.mark.parametrize("build", ["llama_tied", "llama_untied", "gemma2", "granite"])
def test_output_head_from_causal_lm_reproduces_model_logits(build):
    torch.manual_seed(0)
    model = {
        "llama_tied": lambda: _llama(True),
        "llama_untied": lambda: _llama(False),
        "gemma2": _gemma2,
        "granite": _granite,
    }[build]()
    head = OutputHead.from_causal_lm(model)
    tied = build != "llama_untied"
    assert (head.weight is model.get_input_embeddings().weight) == (
        tied and model.config.tie_word_embeddings
    )
    ids = torch.randint(0, V, (2, 5))
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # (2, 5, 8), before the head
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(head.logits(hidden), logits)
    if build == "gemma2":
        assert head.softcap == 0.05 and logits.abs().max() < 0.05  # the cap is active
    if build == "granite":
        assert head.logit_scale == 0.25


def test_bad_arguments_raise():
    s_hidden, t_hidden = _randn(2, 3, H, seed=28), _randn(2, 3, H_TEACHER, seed=29)
    s_w, t_w = _randn(V, H, seed=30), _randn(V, H_TEACHER, seed=31)
    with pytest.raises(ValueError, match="forward_kl"):
        fused_linear_divergence(s_hidden, s_w, t_hidden, t_w, kind="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_divergence(s_hidden, s_w, t_hidden, t_w, chunk_size=0)
    with pytest.raises(ValueError, match="k must be"):
        fused_linear_divergence(s_hidden, s_w, t_hidden, t_w, topk=V + 1)
    with pytest.raises(ValueError, match="mask"):
        fused_linear_divergence(s_hidden, s_w, t_hidden, t_w, torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_divergence(s_hidden, t_w, t_hidden, t_w)
    with pytest.raises(ValueError, match="teacher head"):
        fused_linear_divergence(s_hidden, s_w, t_hidden, s_w)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        fused_linear_divergence(s_hidden, s_w, t_hidden[:1], t_w)
    with pytest.raises(ValueError, match="softcap"):
        OutputHead(s_w, softcap=0.0)
    with pytest.raises(ValueError, match="bias"):
        OutputHead(s_w, torch.zeros(V + 1))
