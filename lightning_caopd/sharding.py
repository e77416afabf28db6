"""Fully sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``) under ``trainer=fsdp``.

Lightning's ``ModelParallelStrategy`` builds a device mesh and calls the module's
``configure_model``, which shards here: each decoder layer of a causal LM is one FSDP unit (its
weights all-gathered just before its forward and freed after), the embeddings, final norm and
head are the root unit. Parameters become ``DTensor`` shards (dim 0 split across the
data-parallel ranks); the optimizer, its states and the gradients are sharded with them.

What reads whole weights goes through this module:

* `gathered`: the model's full weights held for a block (one all-gather per unit on entry,
  none inside), so that generation, which calls the model a different number of times on each
  rank (its rollouts end at different lengths), runs without collectives. Rollouts, the
  evaluation and the teacher's diagnostics run inside it.
* `full_tensor` / `full_model_state_dict`: the whole weights as plain tensors, on every rank
  (collectives: every rank must call them), for the vLLM engine's weight sync and the
  ``student/`` export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM, each one FSDP unit (``model.model.layers``).

    Raises:
        TypeError: the model has no ``get_decoder().layers`` (not a transformers decoder LM).
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"trainer=fsdp shards a causal LM's decoder layers (get_decoder().layers); "
            f"{type(model).__name__} has none. Use trainer=ddp for this model."
        )
    return list(layers)


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``fully_shard`` each decoder layer of `model`, then the model itself, over `mesh`.

    Frozen models (the teacher) are sharded the same way: the teacher's EMA is then a
    shard-by-shard ``lerp_`` and its memory is split as the student's.

    Args:
        model: a transformers causal LM (plain; LoRA students are refused by the module).
        mesh: a 1-D device mesh of the data-parallel ranks.

    Returns:
        `model`, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not any(p.requires_grad for p in model.parameters()):
        # FSDP2 keeps a root unit's weights after forward for the backward that follows; a
        # frozen model has none, and would hold its whole embeddings and head between steps
        model.register_forward_hook(_reshard_unless_held)
    return model


def _reshard_unless_held(model: torch.nn.Module, args, output) -> None:
    """Forward hook of a frozen sharded root: free its gathered weights (not in `gathered`)."""
    if not getattr(model, _HELD, False):
        model.reshard()


def is_sharded(model: object) -> bool:
    """Whether `model` (or a submodule) is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, torch.nn.Module) and any(
        isinstance(m, FSDPModule) for m in model.modules()
    )


_HELD = "_caopd_gathered"  # set on a model while `gathered` holds its weights (nesting is a no-op)


@contextlib.contextmanager
def gathered(model: object) -> Iterator[None]:
    """Hold `model`'s full weights for the block: its forwards then run without collectives.

    Entering all-gathers every FSDP unit once (a collective: every rank enters together) and
    stops the units from freeing their weights after each forward; leaving frees them again.
    Costs the memory of the model's whole weights for the block (not of its gradients or
    optimizer states). Anything that is not a sharded module passes through, and so does a
    model already held by an enclosing `gathered`.
    """
    if not is_sharded(model) or getattr(model, _HELD, False):  # nothing to do, or held already
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    setattr(model, _HELD, True)
    try:
        yield
    finally:
        setattr(model, _HELD, False)
        for unit in units:
            unit.reshard()
            # back to fully_shard's defaults: inner units free their weights after forward, the
            # root keeps them (backward needs them at once; FSDP2 sets this for roots itself)
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A shard's whole tensor (an all-gather: every rank calls it), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every shard gathered into its whole tensor, on every rank.

    Tied weights (one parameter under two names: the embeddings and the head) stay one tensor,
    gathered once, so ``save_pretrained`` writes them once, as it does for the unsharded model.
    """
    whole: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key not in whole:
            whole[key] = full_tensor(t.detach())
        out[name] = whole[key]
    return out
