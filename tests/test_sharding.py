"""`lightning_caopd.sharding` on two CPU processes (gloo): whole weights from a sharded model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _work(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_caopd.models import apply_lora, build_tiny_llama, full_state_dict
    from lightning_caopd.sharding import gathered, shard

    torch.manual_seed(0)  # the same adapter initialisation on both ranks
    results = {}
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    for lora in (False, True):
        model = build_tiny_llama(32, 2, 2, 64)
        if lora:
            model = apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
            with torch.no_grad():  # B starts at zero: give the merge something to add
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_()
        whole = {k: v.clone() for k, v in full_state_dict(model).items()}
        logits = model(input_ids=ids).logits
        shard(model, init_device_mesh("cpu", (2,)))
        sharded_before = isinstance(next(model.parameters()), DTensor)
        got = full_state_dict(model)  # the vLLM engine's sync
        with gathered(model):  # generation's view: plain whole weights, no collective per call
            held = all(type(p) is not DTensor for p in model.parameters())
            held_logits = model(input_ids=ids).logits
        results[lora] = {
            "sharded": sharded_before and isinstance(next(model.parameters()), DTensor),
            "held": held,
            "same_keys": whole.keys() == got.keys(),
            "same_weights": all(torch.equal(whole[k], got[k]) for k in whole),
            "plain": all(type(v) is torch.Tensor for v in got.values()),
            "same_logits": torch.allclose(held_logits, logits, atol=1e-6),
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_models_give_their_whole_weights_plain_and_lora(tmp_path):
    mp.spawn(_work, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for lora in (False, True):
            assert results[lora] == {
                "sharded": True,
                "held": True,
                "same_keys": True,
                "same_weights": True,
                "plain": True,
                "same_logits": True,
            }, (rank, lora)
