"""Identity, brute-force and chunked-vs-unchunked tests for lightning_caopd.divergence."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_caopd.divergence import (
    KINDS,
    divergence_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sequence_mean_loss,
    skip_first_tokens,
    token_divergence,
)

# --------------------------------------------------------------------------------------------
# Brute force: python floats, explicit loops, softmax by hand.
# --------------------------------------------------------------------------------------------


def _softmax(row: list[float], temperature: float) -> list[float]:
    z = [x / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_v p_v log(p_v / q_v), with 0 log 0 = 0."""
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True) if pv > 0)


def _brute(kind, student, teacher, mask, beta=0.5, temperature=1.0):
    n_seq, n_pos, _ = student.shape
    out = torch.zeros(n_seq, n_pos, dtype=torch.float64)
    for i in range(n_seq):
        for t in range(n_pos):
            if not mask[i, t]:
                continue
            p_s = _softmax(student[i, t].tolist(), temperature)
            p_t = _softmax(teacher[i, t].tolist(), temperature)
            if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
                out[i, t] = _kl(p_t, p_s)
            elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
                out[i, t] = _kl(p_s, p_t)
            else:
                mix = [beta * b + (1 - beta) * a for a, b in zip(p_s, p_t, strict=True)]
                out[i, t] = beta * _kl(p_t, mix) + (1 - beta) * _kl(p_s, mix)
    return out


def _logits(*shape, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _mask(n_seq, n_pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_seq, n_pos, generator=g) > 0.3
    mask[0] = True  # at least one full row
    mask[-1] = False  # and one empty row
    return mask


CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 1.0),
]


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_brute_force(kind, beta, temperature):
    student, teacher = _logits(3, 4, 7, seed=1), _logits(3, 4, 7, seed=2)
    mask = _mask(3, 4)
    got = token_divergence(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    want = _brute(kind, student, teacher, mask, beta, temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got[mask].gt(0).all()  # random logits: strictly positive where counted


def test_named_functions_match_dispatcher():
    student, teacher, mask = _logits(2, 3, 5, seed=1), _logits(2, 3, 5, seed=2), _mask(2, 3)
    pairs = [
        (forward_kl(student, teacher, mask), "forward_kl"),
        (reverse_kl(student, teacher, mask), "reverse_kl"),
        (generalized_jsd(student, teacher, mask, beta=0.3), "jsd"),
    ]
    for got, kind in pairs:
        torch.testing.assert_close(got, _brute(kind, student, teacher, mask, beta=0.3))


# --------------------------------------------------------------------------------------------
# Identities.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", CASES)
def test_zero_for_identical_logits(kind, beta):
    logits = _logits(2, 5, 11, seed=3)
    got = token_divergence(logits, logits.clone(), kind=kind, beta=beta)
    torch.testing.assert_close(got, torch.zeros(2, 5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kl_directions_match_f_kl_div():
    student, teacher = _logits(2, 5, 11, seed=4), _logits(2, 5, 11, seed=5)
    s_lp, t_lp = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    # F.kl_div(input, target) = KL(target || input).
    fwd = F.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1)
    rev = F.kl_div(t_lp, s_lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(student, teacher), fwd)
    torch.testing.assert_close(reverse_kl(student, teacher), rev)
    assert not torch.allclose(fwd, rev)  # the directions really differ on this data
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), fwd)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), rev)


def test_jsd_symmetric_at_half():
    student, teacher = _logits(2, 5, 11, seed=6), _logits(2, 5, 11, seed=7)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, beta=0.5), generalized_jsd(teacher, student, beta=0.5)
    )
    # Away from 0.5, swapping the models is the same as mirroring beta.
    torch.testing.assert_close(
        generalized_jsd(student, teacher, beta=0.2), generalized_jsd(teacher, student, beta=0.8)
    )


def test_jsd_ends_are_rescaled_limits_not_plain_limits():
    """Pins TRL's convention: the formula tends to 0 at the ends; the ends are defined as the KLs.

    JSD_beta / beta -> forward KL as beta -> 0, JSD_beta / (1 - beta) -> reverse KL as beta -> 1.
    """
    student, teacher = _logits(2, 3, 9, seed=8), _logits(2, 3, 9, seed=9)
    fwd, rev = forward_kl(student, teacher), reverse_kl(student, teacher)
    eps = 1e-7
    near_0 = generalized_jsd(student, teacher, beta=eps)
    near_1 = generalized_jsd(student, teacher, beta=1 - eps)
    torch.testing.assert_close(near_0 / eps, fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(near_1 / eps, rev, rtol=1e-5, atol=1e-6)
    assert near_0.max() < 1e-5 and near_1.max() < 1e-5  # while beta = 0, 1 give the full KLs


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_minus_inf_vocab_entries_give_no_nan(kind, beta, chunk_size):
    student = _logits(2, 3, 6, seed=10, dtype=torch.float32)
    teacher = _logits(2, 3, 6, seed=11, dtype=torch.float32)
    student[..., 0] = float("-inf")  # banned in both: 0 log 0 terms
    teacher[..., 0] = float("-inf")
    if kind != "reverse_kl" and beta != 1.0:
        teacher[..., 1] = float("-inf")  # teacher-only hole: forward KL stays finite
    if kind != "forward_kl" and beta != 0.0:
        student[..., 2] = float("-inf")  # student-only hole: reverse KL stays finite
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    per_token = token_divergence(student, teacher, kind=kind, beta=beta, chunk_size=chunk_size)
    per_token.sum().backward()
    assert torch.isfinite(per_token).all()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    everything = torch.ones(2, 3, dtype=torch.bool)
    want = _brute(kind, student.detach().double(), teacher.detach().double(), everything, beta)
    torch.testing.assert_close(per_token.double(), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Masking and normalisation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masked_positions_change_nothing(kind, chunk_size):
    student, teacher, mask = _logits(3, 5, 8, seed=12), _logits(3, 5, 8, seed=13), _mask(3, 5)

    def run(s, t):
        s = s.clone().requires_grad_(True)
        loss, per_token = divergence_loss(s, t, mask, kind=kind, chunk_size=chunk_size)
        loss.backward()
        return loss, per_token, s.grad

    loss_a, tok_a, grad_a = run(student, teacher)
    noise = _logits(3, 5, 8, seed=14, scale=10.0) * (~mask)[..., None]
    loss_b, tok_b, grad_b = run(student + noise, teacher - noise)
    assert tok_a[~mask].eq(0).all()
    assert grad_a[~mask].eq(0).all()
    assert grad_a[mask].abs().sum() > 0
    torch.testing.assert_close(loss_a, loss_b, atol=1e-12, rtol=0)
    torch.testing.assert_close(tok_a, tok_b, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-12, rtol=0)


def test_sequence_mean_differs_from_token_mean():
    per_token = torch.tensor([[1.0, 3.0, 5.0, 7.0], [10.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # Row means 4 and 10; the empty third row is excluded: (4 + 10) / 2 = 7.
    # The token mean would be (1 + 3 + 5 + 7 + 10) / 5 = 5.2.
    assert sequence_mean_loss(per_token, mask).item() == pytest.approx(7.0)
    assert (per_token * mask).sum().item() / mask.sum().item() == pytest.approx(5.2)
    # 0/1 masks work the same.
    assert sequence_mean_loss(per_token, mask.long()).item() == pytest.approx(7.0)


def test_sequence_mean_loss_empty_mask_is_connected_zero():
    per_token = torch.rand(2, 3, requires_grad=True)
    loss = sequence_mean_loss(per_token, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert per_token.grad is not None and per_token.grad.eq(0).all()


def test_divergence_loss_value_is_sequence_mean():
    student, teacher, mask = _logits(3, 5, 8, seed=15), _logits(3, 5, 8, seed=16), _mask(3, 5)
    loss, per_token = divergence_loss(student, teacher, mask, kind="reverse_kl")
    want = _brute("reverse_kl", student, teacher, mask)
    rows = [want[i][mask[i]].mean() for i in range(3) if mask[i].any()]
    torch.testing.assert_close(loss, torch.stack(rows).mean())
    torch.testing.assert_close(per_token, want)


def test_skip_first_tokens():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1],  # left offset 2, four tokens
            [1, 1, 1, 0, 0, 0],  # three tokens then padding
            [0, 1, 0, 0, 0, 0],  # a single token
            [1, 0, 1, 1, 0, 1],  # holes inside the row
        ]
    )
    want = torch.tensor(
        [[0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(skip_first_tokens(mask, 2), want)
    assert torch.equal(skip_first_tokens(mask.bool(), 0), mask.bool())
    assert not skip_first_tokens(mask, 10).any()
    with pytest.raises(ValueError, match="non-negative"):
        skip_first_tokens(mask, -1)


# --------------------------------------------------------------------------------------------
# Chunked path.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_chunked_equals_unchunked(kind, beta, chunk_size, temperature):
    n_seq, n_pos, vocab = 3, 9, 50  # 9 positions; most chunk sizes do not divide the K counted
    mask = _mask(n_seq, n_pos, seed=17)
    teacher = _logits(n_seq, n_pos, vocab, seed=18, dtype=torch.float32)
    base = _logits(n_seq, n_pos, vocab, seed=19, dtype=torch.float32)

    def run(chunk):
        student = base.clone().requires_grad_(True)
        teach = teacher.clone().requires_grad_(True)
        loss, per_token = divergence_loss(
            student, teach, mask, kind=kind, beta=beta, temperature=temperature, chunk_size=chunk
        )
        loss.backward()
        return loss, per_token, student.grad, teach.grad

    ref, got = run(None), run(chunk_size)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0


def test_chunked_noncontiguous_and_no_teacher_grad():
    # Completion logits are usually a slice logits[:, p-1:-1] of a longer (N, L, V) tensor.
    full = _logits(2, 12, 30, seed=20, dtype=torch.float32).requires_grad_(True)
    teacher = _logits(2, 12, 30, seed=21, dtype=torch.float32)[:, 3:-1]
    mask = _mask(2, 8, seed=22)
    grads = []
    for chunk in (None, 5):
        full.grad = None
        loss, _ = divergence_loss(full[:, 3:-1], teacher, mask, kind="jsd", chunk_size=chunk)
        loss.backward()
        grads.append(full.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[1][:, :3].eq(0).all() and grads[1][:, -1].eq(0).all()


def test_bfloat16_inputs_computed_in_float32():
    student = _logits(2, 4, 40, seed=23, dtype=torch.float32).bfloat16().requires_grad_(True)
    teacher = _logits(2, 4, 40, seed=24, dtype=torch.float32).bfloat16()
    everything = torch.ones(2, 4, dtype=torch.bool)
    want = _brute("forward_kl", student.detach().double(), teacher.double(), everything)
    for chunk in (None, 3):
        per_token = forward_kl(student, teacher, chunk_size=chunk)
        assert per_token.dtype == torch.float32
        torch.testing.assert_close(per_token.double(), want, atol=1e-5, rtol=1e-5)
        per_token.sum().backward()
        assert student.grad.dtype == torch.bfloat16
        student.grad = None


# --------------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------------


def test_bad_arguments_raise():
    student, teacher, mask = _logits(2, 3, 5), _logits(2, 3, 5, seed=1), _mask(2, 3)
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*jsd"):
        divergence_loss(student, teacher, mask, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        divergence_loss(student, teacher, mask, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        divergence_loss(student, teacher, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        divergence_loss(student, teacher, mask, chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        divergence_loss(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="equal shapes"):
        divergence_loss(student, teacher[..., :4], mask)


# beta = 0 and 1 reuse the KL gradient kernels, already checked here.
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_gradcheck(kind, beta):
    student = _logits(2, 3, 5, seed=25).requires_grad_(True)
    teacher = _logits(2, 3, 5, seed=26).requires_grad_(True)
    mask = _mask(2, 3, seed=27)
    mask[-1, 1] = True  # keep some counted positions in the last row too

    def fn(s, t):
        return token_divergence(s, t, mask, kind=kind, beta=beta, temperature=1.3, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (student, teacher))


def test_empty_completion_row_adds_nothing_to_the_loss():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 7, requires_grad=True), torch.randn(3, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, _ = divergence_loss(s, t, mask)
    ref, _ = divergence_loss(s[[0, 2]], t[[0, 2]], mask[[0, 2]])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert torch.all(s.grad[1] == 0)
