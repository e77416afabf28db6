"""Sampling rollouts and assembling prompt + completion sequences for the forwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from lightning_caopd.checks import check_choice
from lightning_caopd.errors import ConfigError

# a student prompt longer than the limit: its left end cut, or its item left out of the step
PROMPT_OVERFLOW = ("truncate", "skip")


def encode_chats(
    tokenizer: PreTrainedTokenizerBase,
    chats: list[list[dict]],
    max_length: int | None = None,
    overflow: str = "truncate",
    chat_template_kwargs: dict | None = None,
) -> tuple[list[list[int] | None], int]:
    """Render chats with the tokenizer's chat template (generation prompt on) and tokenize them.

    The rendered text already holds the template's special tokens, so none are added again.

    Args:
        tokenizer: the tokenizer with its chat template.
        chats: one message list per prompt.
        max_length: the longest prompt in tokens (None: no limit).
        overflow: what happens to a longer prompt: ``truncate`` drops its left end, keeping
            the question's end and the generation prompt; ``skip`` returns None in its place.
        chat_template_kwargs: extra keyword arguments of the chat template, for every chat
            (``model.chat_template_kwargs``, e.g. ``{"enable_thinking": False}`` for Qwen3).

    Returns:
        The token ids of each prompt (None for a skipped one) and how many prompts were longer
        than `max_length` (truncated or skipped).
    """
    check_choice("method.rollout.prompt_overflow", overflow, PROMPT_OVERFLOW)
    extra = dict(chat_template_kwargs or {})
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True, **extra)
        for c in chats
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    over = 0
    if max_length is not None:
        for i, row in enumerate(ids):
            if len(row) > max_length:
                ids[i] = row[-max_length:] if overflow == "truncate" else None
                over += 1
    return ids, over


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into (N, P) ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (N, T) ids and mask (T >= 1, so empty rows still fit)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def end_ids(model: torch.nn.Module | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config's.

    Chat models often end a turn with one token and a document with another (Qwen:
    ``<|im_end|>`` and ``<|endoftext|>``); ``generation_config.eos_token_id`` lists them all and
    ``generate`` stops at any of them, so the engines do too.

    Args:
        model: the policy (a peft model is read through to its base); None: the tokenizer's only.
        tokenizer: its tokenizer.

    Returns:
        The ids, the tokenizer's EOS first (the one a rewritten completion ends with).
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if i not in ids:
            ids.append(int(i))
    return ids


def completion_mask(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Mask (N, T) of completion tokens up to and including the first stop token.

    Generation pads finished sequences, so anything after the first stop token is not part of
    the completion, whatever its id.
    """
    is_stop = torch.zeros_like(tokens, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= tokens == s
    # number of stop tokens strictly before each position
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return before == 0


@dataclass
class Rollouts:
    """K completions for each of B prompts, prompt-major (row b*K + k).

    Attributes:
        completions: per row, the sampled completion ids up to and including the first stop.
        texts: per row, the decoded completion without special tokens.
        truncated: per row, whether the completion hit the length limit without a stop token.
        logprobs: per row, the sampler's log-probability of each completion token (an engine
            with its own copy of the weights reports them, for the importance-sampling
            correction); None when the rollouts come from the student itself.
    """

    completions: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None


def seeded_draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` (N, V), row i drawn with ``generators[i]``.

    ``multinomial``'s own one-sample method: the argmax of p / E, E ~ Exp(1) per entry.
    """
    noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=g) for g in generators])
    return (probs / noise.to(probs.device)).argmax(dim=-1)


# refused at start-up (`runner.check_config`) and again here, for direct callers
SEEDED_GENERATE = (
    "method.rollout.row_seeds=true with method.engine.use_generate=true: `generate` draws every "
    "row from torch's one generator. Set one of them to false."
)


def row_generators(seeds: list[int], k: int) -> list[torch.Generator]:
    """K CPU generators per prompt seed, prompt-major (row b*K + j), each its own stream."""
    return [torch.Generator().manual_seed(seed * k + j) for seed in seeds for j in range(k)]


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generators: list[torch.Generator] | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` after left-padded rows: a plain KV-cached loop.

    Draws the same tokens as ``model.generate`` (same processors, one ``multinomial`` per step,
    finished rows padded, stop when every row is done), without generate's per-token
    bookkeeping, which dominates small models' decoding on CPU.

    Args:
        model: the policy (in eval mode).
        ids: (N, P) left-padded prompt ids.
        mask: (N, P) their attention mask.
        max_new_tokens: length limit.
        stop_ids: the tokens that end a row (`end_ids`).
        pad_id: written after a row's stop token.
        temperature: sampling temperature.
        top_p: nucleus threshold.
        do_sample: sample (True) or take the argmax.
        generators: one CPU generator per row (None: torch's global generator): row i's tokens
            are then drawn from its own generator only, the same whatever the other rows are.
        min_new_tokens: the stop ids get no mass before this many tokens (as transformers'
            ``MinNewTokensLengthLogitsProcessor``, applied before the warpers).

    Returns:
        (N, T) new token ids, T <= max_new_tokens.
    """
    warpers = [TemperatureLogitsWarper(temperature)] if do_sample and temperature != 1.0 else []
    if do_sample and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    position = (mask.long().cumsum(1) - 1).masked_fill(mask == 0, 1)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position, logits_to_keep=1, use_cache=True
    )
    next_pos = position[:, -1:] + 1
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stops = torch.tensor(stop_ids, device=ids.device)
    tokens = []
    for step in range(max_new_tokens):
        scores = out.logits[:, -1, :].float()  # (N, V)
        if step < min_new_tokens:
            scores[:, stops] = -float("inf")
        for warp in warpers:
            scores = warp(ids, scores)
        if do_sample and generators is not None:
            token = seeded_draw(torch.softmax(scores, dim=-1), generators)
        elif do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1) if tokens else ids.new_zeros(ids.shape[0], 0)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    use_generate: bool = False,
    stop_ids: list[int] | None = None,
    seeds: list[int] | None = None,
    min_new_tokens: int = 0,
) -> Rollouts:
    """`num_samples` completions per prompt, all rows in one batched, KV-cached decode.

    Args:
        model: the policy.
        tokenizer: its tokenizer (pad and EOS ids).
        prompts: B prompt id lists.
        num_samples: K, completions per prompt.
        max_new_tokens: completion length limit.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        do_sample: sample (True) or decode greedily (False).
        use_generate: decode with ``model.generate`` instead of `decode` (the same tokens;
            for models whose forward `decode` does not fit).
        stop_ids: the tokens that end a completion (None: `end_ids` of the model).
        seeds: one seed per prompt (None: torch's global generator): its K rows draw from
            generators of their own (`row_generators`), whatever else is in the batch.
        min_new_tokens: no completion ends (or is cut) before this many tokens.

    Returns:
        `Rollouts` with B*K rows, prompt-major.
    """
    device = next(model.parameters()).device
    stop_ids = end_ids(model, tokenizer) if stop_ids is None else list(stop_ids)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
    was_training = model.training
    model.eval()
    if use_generate and seeds is not None:
        raise ConfigError(SEEDED_GENERATE)
    if use_generate:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            use_cache=True,
            **(sampling if do_sample else {"do_sample": False}),
        )[:, ids.shape[1] :]
    else:
        new = decode(
            model,
            ids,
            mask,
            max_new_tokens,
            stop_ids,
            tokenizer.pad_token_id,
            temperature,
            top_p,
            do_sample,
            None if seeds is None else row_generators(seeds, num_samples),
            min_new_tokens,
        )
    model.train(was_training)
    new = new.cpu()  # (B*K, T)
    keep = completion_mask(new, stop_ids)
    completions, texts, truncated = [], [], []
    for row, m in zip(new.tolist(), keep.tolist(), strict=True):
        comp = [t for t, k in zip(row, m, strict=True) if k]
        completions.append(comp)
        truncated.append(not comp or comp[-1] not in stop_ids)
        texts.append(tokenizer.decode(comp, skip_special_tokens=True, errors="replace"))
    return Rollouts(completions, texts, truncated)


def build_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device=None
) -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by right-padded completions, one row per completion.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` of shape (N, P + T) and
        ``completion_mask`` (N, T); the logits predicting completion token t sit at position
        P - 1 + t, so ``logits_to_keep = T + 1`` and dropping the last one gives them.
    """
    p_ids, p_mask = left_pad(prompts, pad_id)
    c_ids, c_mask = right_pad(completions, pad_id)
    attn = torch.cat([p_mask, c_mask], dim=1)
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": torch.cat([p_ids, c_ids], dim=1).to(device),
        "attention_mask": attn.to(device),
        "position_ids": position_ids.to(device),
        "completion_mask": c_mask.bool().to(device),
    }


def completion_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (N, T, V) for the completion positions only (the head runs on T + 1 positions)."""
    t = batch["completion_mask"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=t + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]


def completion_hidden(body: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states (N, T, H) predicting each completion token.

    `completion_logits` for a model's body without its head (a decoder's forward,
    `lightning_caopd.step.teacher.Teacher.body`).
    """
    t = batch["completion_mask"].shape[1]
    out = body(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.last_hidden_state[:, -t - 1 : -1]


def repeated_prefix(
    read: Callable,
    forward: Callable,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_prefix_logits` without the sharing: each prompt repeated for its K completions.

    Args:
        read: `completion_logits` or `completion_hidden`: what is read from `forward`.
        forward: the model (or its body).
        prompts: B prompt id lists.
        completions: B*K completion id lists, prompt-major.
        pad_id: padding id.
        device: where to run.

    Returns:
        What `read` gives, (B*K, T, V) logits or (B*K, T, H) hidden states, one `build_batch`
        row per completion, and the completion mask (B*K, T).
    """
    k = len(completions) // len(prompts)
    batch = build_batch([p for p in prompts for _ in range(k)], completions, pad_id, device)
    return read(forward, batch), batch["completion_mask"]


def shared_prefix_logits(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion logits with each prompt encoded once for its K completions.

    The K rollouts of a prompt share it as a prefix: the prompts (B, P) run once, their KV cache
    is repeated K times, and the completions (B*K, T) run on top of it. Gradients flow back
    through the shared prefix. Equal to `completion_logits` on `build_batch(prompts repeated K
    times, completions)`.

    Args:
        model: the student or teacher.
        prompts: B prompt id lists.
        completions: B*K completion id lists, prompt-major.
        pad_id: padding id.
        device: where to run.

    Returns:
        Logits (B*K, T, V) predicting each completion token, and the completion mask (B*K, T).
    """
    return _shared_prefix(model, "logits", prompts, completions, pad_id, device, logits_to_keep=1)


def shared_prefix_hidden(
    body: Callable,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_prefix_logits` for a model's body without its head.

    Returns the last hidden states (B*K, T, H) predicting each completion token, and the
    completion mask (B*K, T).
    """
    return _shared_prefix(body, "last_hidden_state", prompts, completions, pad_id, device)


def _shared_prefix(
    forward: Callable, field: str, prompts, completions, pad_id, device, **first_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-prefix forward behind `shared_prefix_logits` / `shared_prefix_hidden`.

    `field` is the output read (``logits``, ``last_hidden_state``).
    """
    k = len(completions) // len(prompts)
    p_ids, p_mask = left_pad(prompts, pad_id, device)
    out = forward(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=(p_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        **first_kwargs,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    first = getattr(out, field)[:, -1:].repeat_interleave(k, dim=0)  # (B*K, 1, *): token 0
    c_ids, c_mask = right_pad(completions, pad_id, p_ids.device)
    width = c_ids.shape[1]
    start = p_mask.sum(1).repeat_interleave(k)[:, None]  # (B*K, 1): positions continue the prompt
    rest = getattr(
        forward(
            input_ids=c_ids[:, :-1],
            attention_mask=torch.cat([p_mask.repeat_interleave(k, dim=0), c_mask[:, :-1]], dim=1),
            position_ids=start + torch.arange(width - 1, device=p_ids.device)[None],
            past_key_values=cache,
            use_cache=True,
        ),
        field,
    )  # (B*K, T-1, *): predicts tokens 1..T-1
    return torch.cat([first, rest], dim=1), c_mask.bool()
