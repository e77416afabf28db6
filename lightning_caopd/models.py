"""Building the student, the teacher and their tokenizer.

The embedded default is a tiny Llama built from a `transformers` config with a real
character-level `PreTrainedTokenizerFast` and a chat template, so the code path that serves it
(`apply_chat_template`, `generate`, `save_pretrained`) is the one real models take.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lightning_caopd.files import atomic_write_dir

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with a chat template.

    Returns:
        A `PreTrainedTokenizerFast` whose every character is one token; `<|end|>` is the EOS.
    """
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
    attn_implementation: str = "eager",
    tie_word_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A randomly initialised Llama for the character tokenizer of `build_char_tokenizer`.

    ``eager`` attention is the faster on CPU for generation at these sizes; ``sdpa`` for
    training on padded batches.
    """
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_pretrained(
    pretrained_model_name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    **kwargs,
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with a dtype given by name (Hydra-friendly)."""
    model = AutoModelForCausalLM.from_pretrained(
        pretrained_model_name_or_path,
        dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation,
        **kwargs,
    )
    return model


def load_tokenizer(pretrained_model_name_or_path: str, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for batched generation (left padding, a pad id)."""
    tok = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
) -> PreTrainedModel:
    """Wrap `model` in a `peft` LoRA adapter: only the adapter's weights train.

    Args:
        model: the student.
        r: adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        target_modules: names of the linear layers that get an adapter (None: peft's default
            for the architecture).
        dropout: dropout on the adapter's input.

    Returns:
        A ``peft.PeftModelForCausalLM``; its ``disable_adapter()`` gives back the base model,
        which `lightning_caopd.step.teacher.make_teacher` uses as the self-distillation
        teacher.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(
            "model.lora needs peft: pip install -e '.[lora]' (or set model.lora=null)."
        ) from e
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules) if target_modules else None,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@torch.no_grad()
def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain copy of `model` would hold, under the names of its checkpoint.

    For a plain causal LM, its ``state_dict``. For a LoRA student (peft), the adapter is merged
    into each weight it wraps (``W + scale * B @ A``, peft's own ``get_delta_weight``), without
    touching the model, and the names are those of the base model's checkpoint
    (``model.layers.0.self_attn.q_proj.weight``): what an inference engine loads.

    Args:
        model: the student (plain or peft-wrapped).

    Returns:
        Name -> detached tensor (shared with the model where nothing was merged).
    """
    if not is_lora(model):  # sharded (trainer=fsdp): every shard gathered, on every rank
        from lightning_caopd.sharding import full_model_state_dict

        return full_model_state_dict(model)
    from peft.tuners.lora import LoraLayer

    from lightning_caopd.sharding import full_tensor, gathered

    base = model.get_base_model()
    merged = {}
    # sharded (trainer=fsdp): the merge runs on the gathered whole weights (every rank takes
    # part), the other tensors are gathered one by one below
    with gathered(model):
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight.detach()
                delta = sum(
                    module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A
                )
                # a copy: the gathered weights are freed on leaving the block
                merged[f"{name}.weight"] = (
                    weight + delta if torch.is_tensor(delta) else weight.clone()
                )
    out = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        out[name] = merged[name] if name in merged else full_tensor(tensor.detach())
    return out


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` carries a peft adapter."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def check_same_tokenizer(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase
) -> None:
    """Raise a clear error when student and teacher tokenizers differ.

    Token-level distillation compares next-token distributions position by position, so both
    models must share one vocabulary.
    """
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            "The student and teacher tokenizers differ (vocabularies of "
            f"{len(student_tok)} and {len(teacher_tok)} tokens). Token-level distillation needs "
            "one shared vocabulary: pick a teacher from the same model family, or leave "
            "`teacher` unset to self-distil from the student's own initial weights."
        )


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model and tokenizer with `save_pretrained`, via a temporary folder then a rename.

    `state_dict` replaces the model's own weights (a sharded model's, gathered).
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)

    return atomic_write_dir(path, write)
