"""The expected-confidence readout: the mean of a model's distribution over its stated confidence.

Greedy decoding writes the confidence digit by digit, each the most likely one: the mode of the
model's confidence distribution, token by token. CaOPD teaches that distribution P_acc over K
rollouts; where the student cannot tell its prompts apart, the distribution is the mixture of their
P_acc values, and its mode can sit far from its mean (docs/results.md, "The scaling law of
miscalibration" and "A real model"). Under the squared error (the Brier score) the best single value
to state from a predictive distribution is its mean (Lukasik et al., "Regression-aware inference
with LLMs", 2024). `expected_confidences` reads it: after the answer the model wrote, each value of
the grid 0.00, 0.01, ..., 1.00 is scored as the confidence literal, and the stated confidence
becomes their probability-weighted mean (``eval.confidence_readout=expected``; the answer, and so
the accuracy, is the greedy one either way).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_caopd.confidence import char_offsets, confidence_span, span_tokens
from lightning_caopd.rollout import shared_prefix_logits

READOUTS = ("greedy", "expected")
GRID = [i / 100 for i in range(101)]  # the values scored, written as "{:.2f}"


@torch.no_grad()
def expected_confidences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    completions: list[list[int]],
    texts: list[str],
    rows_per_forward: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the model's confidence distribution after each completion's answer.

    For a completion that states a confidence, the context is its prompt and its tokens up to
    the first token of the confidence literal; each grid value, written ``{:.2f}`` after what
    that token holds before the literal (a space, for tokenizers that join it to the digit), is
    scored by the sum of its tokens' log-probabilities. The value's weight is its probability
    renormalised over the grid.

    Args:
        model: the model that wrote the completions.
        tokenizer: its tokenizer.
        prompts: the prompt ids the completions follow.
        completions: the completion ids.
        texts: their decoded texts (special tokens skipped), as the parser read them.
        rows_per_forward: completions scored per forward (each is the grid's 101 rows).

    Returns:
        (N,) expected confidences, NaN where a completion states none; (N,) the probability
        mass the grid holds there (how much of the distribution the readout saw), NaN likewise.
    """
    n = len(texts)
    expected = torch.full((n,), float("nan"))
    mass = torch.full((n,), float("nan"))
    jobs = []  # (row, context ids, candidate ids per grid value)
    for i, (ids, text) in enumerate(zip(completions, texts, strict=True)):
        span = confidence_span(text)
        if span is None:
            continue
        offsets = char_offsets(ids, tokenizer)
        first = span_tokens(offsets, *span)[0]
        lead = text[offsets[first] : span[0]]
        candidates = [tokenizer.encode(f"{lead}{v:.2f}", add_special_tokens=False) for v in GRID]
        jobs.append((i, prompts[i] + ids[:first], candidates))
    device = next(model.parameters()).device
    values = torch.tensor(GRID, dtype=torch.float64)
    for s in range(0, len(jobs), rows_per_forward):
        chunk = jobs[s : s + rows_per_forward]
        flat = [c for _, _, cands in chunk for c in cands]
        logits, mask = shared_prefix_logits(
            model, [ctx for _, ctx, _ in chunk], flat, tokenizer.pad_token_id, device
        )
        targets = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(c) for c in flat], batch_first=True, padding_value=0
        ).to(logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        score = (logp.double() * mask).sum(dim=1).view(len(chunk), len(GRID)).cpu()
        for (i, _, _), row in zip(chunk, score, strict=True):
            weights = torch.softmax(row, dim=0)
            expected[i] = float((weights * values).sum())
            mass[i] = float(row.exp().sum())
    return expected, mass
