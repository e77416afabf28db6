"""The stated confidence against the model's own confidence distribution, per family.

For a LoRA run of the arithmetic task (``experiment=smollm2 method=caopd`` or ``method=opd``), the
base (adapter off) and the trained student (adapter on) answer the held-out items greedily, as
the evaluation does. Each completion is then cut after ``Confidence: 0.`` and one forward gives
the model's probability of ``1`` as the confidence's first token and of each tenths digit after
``0.``. Per family it prints the accuracy, the greedy stated confidence, ``p_one`` and the
expected confidence ``P(1) + P(0) * sum_d P(d) * (d / 10 + 0.04)`` (the hundredths digit taken
as its mean on the k/8 grid), and which tenths digits are the most likely ones.

A greedy confidence is the mode of that distribution, token by token; when the distribution is
wide, the mode can sit far from its mean.

Usage:
    python benchmarks/confidence_distribution.py outputs/smollm2/experiment=smollm2,method=caopd
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_caopd.tasks.arith import ArithTask, make_items


def family_rows(model, tok, task, items, adapter: bool, batch: int = 50) -> dict[str, list]:
    """Per family: (correct, stated confidence, P(1), expected confidence, argmax tenths)."""
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    rows: dict[str, list] = defaultdict(list)
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        prompts = [
            tok.apply_chat_template(
                task.student_messages(it), tokenize=False, add_generation_prompt=True
            )
            for it in chunk
        ]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with nullcontext() if adapter else model.disable_adapter(), torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id
            )
            texts = tok.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            cut = [t.split("\nConfidence:")[0] + "\nConfidence: 0." for t in texts]
            enc2 = tok(
                [p + c for p, c in zip(prompts, cut, strict=True)],
                return_tensors="pt",
                padding=True,
            )
            logits = model(**enc2).logits
        first = logits[:, -3].softmax(-1)  # the token after "Confidence: " ("0" or "1")
        tenths = logits[:, -1].softmax(-1)[:, digits]  # the digit after "0."
        for it, text, pf, pd in zip(chunk, texts, first, tenths, strict=True):
            stated = re.search(r"Confidence:\s*([0-9.]+)", text)
            pd = pd / pd.sum()
            p1, p0 = pf[digits[1]].item(), pf[digits[0]].item()
            expected = p1 + p0 * sum(pd[d].item() * (d / 10 + 0.04) for d in range(10))
            rows[it["category"]].append(
                (
                    task.verify(text, it),
                    float(stated.group(1)) if stated else None,
                    p1,
                    expected,
                    int(pd.argmax()),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a LoRA run directory (its student/ holds the adapter)")
    parser.add_argument("--base", default=".cache/smollm2_arith_base")
    parser.add_argument("--n", type=int, default=300, help="held-out items (seed 0)")
    parser.add_argument("--out", default="benchmarks/results/confidence_distribution.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.base)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, Path(args.run) / "student").eval()
    task, items = ArithTask(), make_items(args.n, 0, "eval")
    result = {}
    for name, adapter in (("base", False), ("trained", True)):
        rows = family_rows(model, tok, task, items, adapter)
        result[name] = {
            family: {
                "accuracy": statistics.mean(r[0] for r in v),
                "greedy_confidence": statistics.mean(r[1] for r in v if r[1] is not None),
                "p_one": statistics.mean(r[2] for r in v),
                "expected_confidence": statistics.mean(r[3] for r in v),
                "argmax_tenths": sorted({r[4] for r in v}),
            }
            for family, v in sorted(rows.items())
        }
        for family, v in result[name].items():
            shown = {k: round(x, 3) if isinstance(x, float) else x for k, x in v.items()}
            print(name, family, shown, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run, **result}, indent=1) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
