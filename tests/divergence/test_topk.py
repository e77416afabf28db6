"""Top-k + tail divergences: k = V identity, hand-checked values, gradients, masks."""

import math

import pytest
import torch

from lightning_caopd.divergence import (
    KINDS,
    divergence_loss,
    sequence_mean_loss,
    token_divergence,
    topk_tail_divergence,
    topk_tail_log_probs,
    topk_tail_loss,
)

CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _logits(*shape, seed=0, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _mask(n_seq, n_pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_seq, n_pos, generator=g) > 0.3
    mask[0] = True
    mask[-1] = False
    return mask


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _divergence(kind, beta, p_s, p_t):
    """Brute-force divergence between two explicit distributions (python floats)."""
    if kind == "forward_kl" or beta == 0.0:
        return _kl(p_t, p_s)
    if kind == "reverse_kl" or beta == 1.0:
        return _kl(p_s, p_t)
    mix = [beta * b + (1 - beta) * a for a, b in zip(p_s, p_t, strict=True)]
    return beta * _kl(p_t, mix) + (1 - beta) * _kl(p_s, mix)


# --------------------------------------------------------------------------------------------
# k = V is the full divergence.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_k_equals_vocab_is_full_divergence(kind, beta, temperature):
    n_seq, n_pos, vocab = 3, 5, 11
    mask = _mask(n_seq, n_pos, seed=1)
    teacher = _logits(n_seq, n_pos, vocab, seed=2)
    base = _logits(n_seq, n_pos, vocab, seed=3)

    def run(fn, **kw):
        student = base.clone().requires_grad_(True)
        loss, per_token = fn(
            student, teacher, mask, kind=kind, beta=beta, temperature=temperature, **kw
        )
        loss.backward()
        return loss, per_token, student.grad

    want = run(divergence_loss)
    got = run(topk_tail_loss, k=vocab)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert got[2][mask].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# k < V, by hand.
# --------------------------------------------------------------------------------------------

P_TEACHER = [0.5, 0.3, 0.15, 0.05]
P_STUDENT = [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("kind,beta", CASES)
def test_hand_checked_k2_teacher_support(kind, beta):
    # Teacher's top 2 are tokens 0 and 1; the tail holds tokens 2 and 3.
    teacher = torch.tensor(P_TEACHER, dtype=torch.float64).log().view(1, 1, 4)
    student = torch.tensor(P_STUDENT, dtype=torch.float64).log().view(1, 1, 4)
    got = topk_tail_divergence(student, teacher, k=2, kind=kind, beta=beta)
    want = _divergence(kind, beta, [0.1, 0.2, 0.7], [0.5, 0.3, 0.2])
    assert got.item() == pytest.approx(want, abs=1e-12)
    assert got.item() < token_divergence(student, teacher, kind=kind, beta=beta).item()


def test_hand_checked_values_and_student_support():
    teacher = torch.tensor(P_TEACHER, dtype=torch.float64).log().view(1, 1, 4)
    student = torch.tensor(P_STUDENT, dtype=torch.float64).log().view(1, 1, 4)
    # Written out: forward KL on {0, 1, tail} with teacher (.5, .3, .2), student (.1, .2, .7).
    fwd = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    got = topk_tail_divergence(student, teacher, k=2)
    assert got.item() == pytest.approx(fwd, abs=1e-12)
    # The student's top 2 are tokens 3 and 2: student (.4, .3, .3), teacher (.05, .15, .8).
    s_lp, t_lp = topk_tail_log_probs(student, teacher, 2, support="student")
    torch.testing.assert_close(s_lp.exp().view(-1), torch.tensor([0.4, 0.3, 0.3]).double())
    torch.testing.assert_close(t_lp.exp().view(-1), torch.tensor([0.05, 0.15, 0.8]).double())
    rev = 0.4 * math.log(0.4 / 0.05) + 0.3 * math.log(0.3 / 0.15) + 0.3 * math.log(0.3 / 0.8)
    got = topk_tail_divergence(student, teacher, k=2, kind="reverse_kl", support="student")
    assert got.item() == pytest.approx(rev, abs=1e-12)


@pytest.mark.parametrize("kind,beta", CASES)
def test_monotone_in_k(kind, beta):
    """Coarsening never increases an f-divergence, and top-(k-1)+tail coarsens top-k+tail."""
    student, teacher = _logits(2, 3, 9, seed=4), _logits(2, 3, 9, seed=5)
    values = [
        topk_tail_divergence(student, teacher, k=k, kind=kind, beta=beta) for k in range(1, 10)
    ]
    for smaller, larger in zip(values, values[1:], strict=False):
        assert (smaller <= larger + 1e-6).all()
    assert (values[0] < values[-1]).any()


# --------------------------------------------------------------------------------------------
# Gradients, stability, masks.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", CASES)
def test_teacher_carries_no_gradient(kind, beta):
    base = _logits(2, 3, 7, seed=6)
    student = base.clone().requires_grad_(True)
    teacher = (student * 0.5 + 1.0) ** 2  # teacher logits that depend on the student's graph
    loss, _ = topk_tail_loss(student, teacher, _mask(2, 3), k=3, kind=kind, beta=beta)
    loss.backward()
    ref = base.clone().requires_grad_(True)
    loss_ref, _ = topk_tail_loss(
        ref, ((base * 0.5 + 1.0) ** 2), _mask(2, 3), k=3, kind=kind, beta=beta
    )
    loss_ref.backward()
    torch.testing.assert_close(student.grad, ref.grad, atol=1e-7, rtol=0)

    leaf_teacher = _logits(2, 3, 7, seed=7).requires_grad_(True)
    loss, _ = topk_tail_loss(base.clone().requires_grad_(True), leaf_teacher, _mask(2, 3), k=3)
    loss.backward()
    assert leaf_teacher.grad is None


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("k", [2, 6])
def test_matches_float64_brute_force_and_gradcheck(kind, beta, k):
    student = _logits(2, 2, 6, seed=8, dtype=torch.float64).requires_grad_(True)
    teacher = _logits(2, 2, 6, seed=9, dtype=torch.float64)
    got = topk_tail_divergence(student, teacher, k=k, kind=kind, beta=beta, temperature=1.3)
    for i in range(2):
        for t in range(2):
            p_s = torch.softmax(student[i, t].detach() / 1.3, -1).tolist()
            p_t = torch.softmax(teacher[i, t] / 1.3, -1).tolist()
            top = sorted(range(6), key=lambda v, p_t=p_t: -p_t[v])[:k]
            # At k = V the tail is empty; 1 - sum would leave +-1e-16 of rounding.
            rest_s = 1.0 - sum(p_s[v] for v in top) if k < 6 else 0.0
            rest_t = 1.0 - sum(p_t[v] for v in top) if k < 6 else 0.0
            want = _divergence(
                kind, beta, [p_s[v] for v in top] + [rest_s], [p_t[v] for v in top] + [rest_t]
            )
            assert got[i, t].item() == pytest.approx(want, abs=1e-10)

    def fn(s):
        return topk_tail_divergence(s, teacher, k=k, kind=kind, beta=beta, temperature=1.3)

    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
def test_extreme_and_banned_logits_stay_finite(kind, beta):
    # The teacher's top 2 hold all but ~1e-17 of its mass: 1 - sum(top) is 0 in float32, while
    # the logsumexp tail keeps it. Tokens 4, 5 are banned (-inf) in both models.
    teacher = torch.tensor([[[0.0, -1.0, -40.0, -41.0, float("-inf"), float("-inf")]]])
    student = _logits(1, 1, 6, seed=10).requires_grad_(True)
    with torch.no_grad():
        student[..., 4:] = float("-inf")
    per_token = topk_tail_divergence(student, teacher, k=2, kind=kind, beta=beta)
    per_token.sum().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(student.grad).all()
    s_lp, t_lp = topk_tail_log_probs(
        torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1), 2
    )
    want_tail = torch.logsumexp(torch.tensor([-40.0, -41.0]), 0) - torch.logsumexp(
        torch.tensor([0.0, -1.0, -40.0, -41.0]), 0
    )
    torch.testing.assert_close(t_lp[0, 0, -1], want_tail)  # about -39.7, not -inf
    assert torch.isfinite(s_lp).all()
    # Everything outside the support banned: an empty (-inf) tail, still no NaN.
    teacher[..., 2:] = float("-inf")
    student.grad = None
    per_token = topk_tail_divergence(student, teacher, k=2, kind=kind, beta=beta)
    per_token.sum().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_change_nothing(kind):
    student, teacher, mask = _logits(3, 5, 8, seed=11), _logits(3, 5, 8, seed=12), _mask(3, 5)

    def run(s, t):
        s = s.clone().requires_grad_(True)
        loss, per_token = topk_tail_loss(s, t, mask, k=3, kind=kind)
        loss.backward()
        return loss, per_token, s.grad

    loss_a, tok_a, grad_a = run(student, teacher)
    noise = _logits(3, 5, 8, seed=13, scale=10.0) * (~mask)[..., None]
    loss_b, tok_b, grad_b = run(student + noise, teacher - noise)
    assert tok_a[~mask].eq(0).all() and grad_a[~mask].eq(0).all()
    assert grad_a[mask].abs().sum() > 0
    torch.testing.assert_close(loss_a, sequence_mean_loss(tok_a, mask))
    torch.testing.assert_close((loss_b, tok_b, grad_b), (loss_a, tok_a, grad_a))


def test_bad_arguments_raise():
    student, teacher, mask = _logits(2, 3, 5), _logits(2, 3, 5, seed=1), _mask(2, 3)
    for k in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            topk_tail_loss(student, teacher, mask, k=k)
    with pytest.raises(ValueError, match="support"):
        topk_tail_loss(student, teacher, mask, k=2, support="both")
    with pytest.raises(ValueError, match="forward_kl"):
        topk_tail_loss(student, teacher, mask, k=2, kind="kl")
    with pytest.raises(ValueError, match="equal shapes"):
        topk_tail_loss(student, teacher[..., :4], mask, k=2)
