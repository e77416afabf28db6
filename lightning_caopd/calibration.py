"""CaOPD: the calibration-aware add-on to any OPD loop (arXiv 2604.16830, Sec. 3).

CaOPD changes one thing in OPD: the confidence target. It measures the student's empirical
success rate ``P_acc`` (correct rollouts / K for a prompt) and writes it in three places:

(a) the student's completion: each rollout is cut at its confidence line at the token level
    (its last one, or with ``cut="first"`` its first, as the released code) and
    ``Confidence: {P_acc:.2f}`` is appended (the tokens the student sampled before it are kept
    as sampled, never decoded and re-encoded);
(b) the teacher's privileged solution: its ``Confidence: 1.00`` becomes ``P_acc``;
(c) a note in the teacher's context stating the empirical confidence and asking to output it.

Both methods are a `ConfidenceTargets` policy that the method config chooses
(``method.targets``): plain OPD keeps the sampled completions and the template's context
(`ConfidenceTargets`), CaOPD replaces them (`CaOPD`). The training step calls the policy and has
no CaOPD branch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lightning_caopd.checks import check_bool, check_choice, check_format
from lightning_caopd.confidence import strip_confidence, strip_confidence_reference
from lightning_caopd.errors import ConfigError
from lightning_caopd.templates import with_confidence

DEFAULT_NOTE = "Empirical confidence: {p_acc:.2f}. Output it."
CUTS = ("last", "first")


def empirical_accuracy(correct: torch.Tensor, k: int) -> torch.Tensor:
    """P_acc per prompt from a flat (B*K,) correctness vector ordered prompt-major."""
    return correct.float().view(-1, k).mean(dim=1)  # (B,)


def p_acc_stats(p_acc: torch.Tensor) -> dict[str, float]:
    """The share of prompt groups whose rollouts are all wrong (P_acc 0) or all right (1)."""
    return {
        "p_acc_zero_frac": (p_acc == 0).float().mean().item(),
        "p_acc_one_frac": (p_acc == 1).float().mean().item(),
    }


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _kept_prefix_tokens(ids: list[int], keep_chars: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """The largest n with len(decode(ids[:n])) <= keep_chars (binary search, decode is monotone)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid])) <= keep_chars:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ConfidenceTargets:
    """OPD's confidence targets: the sampled completions and the teacher's context as they are.

    What the teacher's privileged context says, the student learns to say.
    """

    # whether a rollout with no privileged solution (SDPO: no successful sibling) stays in the
    # loss, its teacher seeing the note alone
    note_only_rows: bool = False

    def teacher_context(self, context: str, p_acc: float) -> str:
        """The privileged context the teacher sees for a prompt group."""
        return context

    def teacher_note(self, p_acc: float) -> str:
        """A note for the teacher's context (none)."""
        return ""

    def student_completion(
        self,
        ids: list[int],
        p_acc: float,
        tokenizer: PreTrainedTokenizerBase,
        end_ids: list[int] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[int]:
        """The completion the student is trained on: the sampled ids."""
        return list(ids)

    def apply(
        self,
        completions: list[list[int]],
        p_acc: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        end_ids: list[int] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[list[int]]:
        """Every rollout's training completion; `completions` are B*K, prompt-major.

        `end_ids` are the ids a rollout may end with (`lightning_caopd.rollout.end_ids`; None:
        the tokenizer's EOS); `max_new_tokens` is the rollouts' length limit
        (``method.rollout.max_new_tokens``), a cap on a rewritten completion's length where the
        policy keeps one (None: no cap).
        """
        k = len(completions) // max(1, len(p_acc))
        return [
            self.student_completion(ids, p_acc[i // k].item(), tokenizer, end_ids, max_new_tokens)
            for i, ids in enumerate(completions)
        ]

    def check(self, num_rollouts: int) -> None:
        """Refuse settings the policy cannot work with (at start-up).

        Raises:
            ConfigError: naming the keys and what to change.
        """


@dataclass
class CaOPD(ConfidenceTargets):
    """Confidence-target replacement: the CaOPD policy (``method=caopd``).

    Args:
        confidence_format: the confidence line written into completions and contexts.
        note: the note inserted into the teacher's context, formatted with ``p_acc``.
        replace_student: apply replacement (a).
        replace_context: apply replacement (b).
        add_note: apply replacement (c).
        note_only_rows: on a per-rollout source (SDPO), a rollout with no successful sibling
            stays in the loss, against a teacher whose context is the note alone (SDPO's
            feedback-only reprompt, the note as the feedback). Without it a group with P_acc 0
            leaves the loss and never learns to state 0. Needs ``add_note``.
        cut: where replacement (a) cuts a rollout: ``last``, at the start of its last
            confidence statement (`strip_confidence`: anything the student wrote after an
            earlier one stays), or ``first``, the released code's rule: at its first
            ``Confidence:`` (`strip_confidence_reference`: what follows it goes, trailing
            whitespace too) and the completion capped at the rollout length (see
            `student_completion`).
    """

    confidence_format: str = "Confidence: {p_acc:.2f}"
    note: str = DEFAULT_NOTE
    replace_student: bool = True
    replace_context: bool = True
    add_note: bool = True
    note_only_rows: bool = False
    cut: str = "last"

    def __post_init__(self) -> None:
        check_format("method.targets.confidence_format", self.confidence_format, ["p_acc"])
        check_format("method.targets.note", self.note, ["p_acc"], required=False)
        for name in ("replace_student", "replace_context", "add_note", "note_only_rows"):
            check_bool(f"method.targets.{name}", getattr(self, name))
        check_choice("method.targets.cut", self.cut, CUTS)
        if self.note_only_rows and not self.add_note:
            raise ConfigError(
                "method.targets.note_only_rows=true needs method.targets.add_note=true: a row "
                "without a solution has only the note to tell its teacher P_acc."
            )

    def check(self, num_rollouts: int) -> None:
        """CaOPD measures P_acc over the K rollouts of a prompt: K must be 2 or more."""
        if num_rollouts < 2:
            raise ConfigError(
                f"CaOPD needs K >= 2 rollouts per prompt to measure P_acc; got "
                f"method.rollout.num_rollouts={num_rollouts}. Set it to 2 or more (the paper "
                "uses 8)."
            )

    def confidence_line(self, p_acc: float) -> str:
        """The confidence line for an empirical accuracy."""
        return self.confidence_format.format(p_acc=p_acc)

    def teacher_context(self, context: str, p_acc: float) -> str:
        """Replacement (b): the privileged solution states ``P_acc`` instead of 1.00."""
        return (
            with_confidence(context, self.confidence_line(p_acc))
            if self.replace_context
            else context
        )

    def teacher_note(self, p_acc: float) -> str:
        """Replacement (c): the note for the teacher's context (empty when disabled)."""
        return self.note.format(p_acc=p_acc) if self.add_note else ""

    def student_completion(
        self,
        ids: list[int],
        p_acc: float,
        tokenizer: PreTrainedTokenizerBase,
        end_ids: list[int] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[int]:
        """Replacement (a) at the token level.

        Args:
            ids: the rollout's completion token ids, without padding; may end with an end id.
            p_acc: the empirical accuracy of the rollout's group.
            tokenizer: the shared tokenizer.
            end_ids: the ids a rollout may end with (None: the tokenizer's EOS); the rewritten
                completion ends with the tokenizer's EOS.
            max_new_tokens: with ``cut="first"``, the longest completion (kept tokens,
                confidence line and EOS) allowed, as the released code caps it at its
                ``max_completion_length``; kept tokens are dropped from the end until it fits
                (the released code drops 80 characters of the decoded text at a time; here
                whole tokens, so that the kept ones stay as sampled). None: no cap. Unused
                with ``cut="last"``.

        Returns:
            The sampled ids up to the cut (``cut``), then the tokenized confidence line and
            EOS. A rollout without a confidence line keeps all its sampled tokens (with
            ``cut="first"``, less trailing whitespace and any cap) and gains the line at the
            end. ``cut="last"`` starts the line on a new line unless the kept text already
            ends with one; ``cut="first"`` always writes ``\\n`` before it, as the released code.
        """
        if not self.replace_student:
            return list(ids)
        eos = tokenizer.eos_token_id
        ends = [eos] if end_ids is None else end_ids
        body = list(ids[:-1]) if ids and ids[-1] in ends else list(ids)
        text = tokenizer.decode(body)
        strip = strip_confidence_reference if self.cut == "first" else strip_confidence
        keep_chars = len(strip(text))
        n = _kept_prefix_tokens(body, keep_chars, tokenizer)
        kept_text = tokenizer.decode(body[:n])
        gap = text[len(kept_text) : keep_chars]  # chars of a token straddling the cut, if any
        if self.cut == "first":
            return self._capped(body[:n], gap, p_acc, tokenizer, max_new_tokens)
        if not (kept_text + gap).endswith("\n") and (kept_text + gap):
            gap += "\n"
        return body[:n] + _encode(tokenizer, gap + self.confidence_line(p_acc)) + [eos]

    def _capped(
        self,
        kept: list[int],
        gap: str,
        p_acc: float,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int | None,
    ) -> list[int]:
        """``cut="first"``'s completion: `kept` ids, `gap`, ``\\n``, the line and EOS, capped."""
        line = "\n" + self.confidence_line(p_acc)
        tail = _encode(tokenizer, gap + line)
        if max_new_tokens is None or len(kept) + len(tail) + 1 <= max_new_tokens:
            return kept + tail + [tokenizer.eos_token_id]
        tail = _encode(tokenizer, line)  # cut inside the kept text: the straddling chars go
        kept = kept[: max(0, max_new_tokens - 1 - len(tail))]
        # a line longer than the cap itself is cut too, as the released code's truncation does
        return (kept + tail)[: max(0, max_new_tokens - 1)] + [tokenizer.eos_token_id]
