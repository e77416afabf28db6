"""LoRA students and vLLM: sync the merged weights, or hand vLLM the adapter as a LoRA request?

Two ways to give a colocated vLLM engine a LoRA student's current policy each optimizer step:

- ``merged`` (what ``method/engine=vllm`` does): the adapter merged into the full weights
  (`lightning_caopd.models.full_state_dict`), loaded in place with ``reload_weights``; the
  rollouts then run on plain weights;
- ``lora_request``: vLLM started with ``enable_lora=True`` and the base weights once; every step
  the adapter is saved (``save_pretrained``, adapter only) and the rollouts are generated with a
  new ``LoRARequest`` (a new id, so vLLM loads the new adapter), vLLM applying the adapter in
  every forward.

Builds the module of an experiment as ``train.py`` does (``experiment=smollm2 method=opd``: LoRA
rank 16 on every linear layer of the body), changes the adapter a little before every step (as an
optimizer step would) and times, per step, each way's weight hand-over and its rollouts on the
same prompts (the two interleaved, alternating which goes first). ``--out`` keeps everything.

Usage:
    python benchmarks/lora_sync.py experiment=smollm2 method=opd --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_split import build  # noqa: E402


def lora_llm(engine, base_state: dict, rank: int):
    """A second ``vllm.LLM`` like `engine`'s, with LoRA enabled and the base weights loaded."""
    from lightning_caopd.vllm_engine import _kept_process_state, import_vllm

    vllm = import_vllm()
    with _kept_process_state():
        llm = vllm.LLM(
            model=engine._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",
            dtype="float32",
            seed=0,
            max_model_len=engine.llm.llm_engine.model_config.max_model_len,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            kv_cache_memory_bytes=int(engine.cpu_kv_cache_gib * 2**30),
            enable_lora=True,
            max_lora_rank=rank,
            max_loras=1,
        )
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(base_state.items())})
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/lora_sync.json")
    args = parser.parse_args()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    cfg, module, loader, _ = build([*args.overrides, "method/engine=vllm"])
    student, engine, r = module.student, module.engine, module.rollout
    peft_model = student
    rank = peft_model.peft_config["default"].r
    engine.sync_weights(student)  # starts the merged engine
    with torch.no_grad():
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_state = {
                k.replace("base_layer.", ""): v
                for k, v in base.state_dict().items()
                if "lora_" not in k
            }
    llm = lora_llm(engine, base_state, rank)
    adapters = [p for n, p in student.named_parameters() if "lora_" in n]
    tmp = tempfile.TemporaryDirectory(prefix="lora_sync_")
    rows: dict[str, list[dict]] = {"merged": [], "lora_request": []}
    for i, batch in enumerate(itertools.islice(loader, args.warmup + args.steps)):
        with torch.no_grad():  # an optimizer step's worth of change
            for p in adapters:
                p.add_(torch.randn_like(p) * 1e-3)
        _, prompts, _ = module.student_prompts(batch)
        order = ["merged", "lora_request"] if i % 2 == 0 else ["lora_request", "merged"]
        for way in order:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
            if way == "merged":
                start = time.perf_counter()
                engine.sync_weights(student)
                sync = time.perf_counter() - start
                start = time.perf_counter()
                engine.sample(prompts, r.num_rollouts, r.max_new_tokens, r.temperature, r.top_p)
                gen = time.perf_counter() - start
            else:
                start = time.perf_counter()
                path = Path(tmp.name) / f"step{i}"
                peft_model.save_pretrained(path)
                request = LoRARequest(f"step{i}", i + 1, str(path))
                sync = time.perf_counter() - start
                params = [
                    SamplingParams(
                        n=r.num_rollouts,
                        max_tokens=r.max_new_tokens,
                        temperature=r.temperature,
                        top_p=r.top_p,
                        seed=s,
                        logprobs=0,
                        stop_token_ids=engine.stop_ids,
                        detokenize=False,
                    )
                    for s in seeds
                ]
                start = time.perf_counter()
                llm.generate(
                    [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                    params,
                    lora_request=request,
                    use_tqdm=False,
                )
                gen = time.perf_counter() - start
            row = {"sync": sync, "rollouts": gen, "total": sync + gen}
            print(f"step {i} [{way}]: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()))
            if i >= args.warmup:
                rows[way].append(row)
    medians = {
        way: {k: statistics.median(x[k] for x in rs) for k in ("sync", "rollouts", "total")}
        for way, rs in rows.items()
    }
    ratio = statistics.median(
        a["total"] / b["total"] for a, b in zip(rows["lora_request"], rows["merged"], strict=True)
    )
    for way, m in medians.items():
        print(f"{way:<13} " + ", ".join(f"{k} {v:.2f}s" for k, v in m.items()))
    print(f"lora_request / merged, median of per-step ratios (sync + rollouts): {ratio:.3f}")
    result = {
        "overrides": args.overrides,
        "lora_rank": rank,
        "prompts": cfg.data.batch_size,
        "k": r.num_rollouts,
        "max_new_tokens": r.max_new_tokens,
        "threads": torch.get_num_threads(),
        "median_s": medians,
        "lora_request_over_merged": ratio,
        "per_step_s": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
