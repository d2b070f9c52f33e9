"""Rebuild TP = 1 tensors from the shards of the ranks, with torch.distributed directly (not through the
code under test), for checks that compare a parallel module against a plain reference."""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from megatron_tokenformer import parallel_state


def full_tensor(shard: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """Concatenation over the tensor-parallel ranks of ``shard`` along ``dim`` (a copy at world 1)."""
    if world == 1:
        return shard.detach().clone()
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def full_parameters(module: torch.nn.Module, world: int) -> Dict[str, torch.Tensor]:
    """name -> TP = 1 value of every parameter (partitioned ones gathered along ``partition_dim``)."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = full_tensor(p, p.partition_dim, world) if getattr(p, "tensor_model_parallel", False) \
            else p.detach().clone()
    return out


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a TP = 1 tensor, for the parameter ``param``."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(world, dim=param.partition_dim)[rank]
