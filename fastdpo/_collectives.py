"""Small collectives shared by the vocab-parallel and context-parallel paths: where host-built tensors live for a
group's backend, and an all-gather of a few integers per rank (layout checks)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group, like: torch.device | None = None) -> torch.device:
    """Where a collective's host-built tensors live: for NCCL the data's CUDA device (``like``) or else the current
    one, for other backends the CPU."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return like if like is not None and like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def gather_ints(values, group, device: torch.device | None = None) -> list[list[int]]:
    """Every rank's ``values`` (a few integers or 0-d integer tensors), in rank order: one all-gather of
    ``len(values)`` integers per rank and one host sync."""
    cdev = collective_device(group, device)
    mine = torch.stack([torch.as_tensor(v).to(device=cdev, dtype=torch.long) for v in values])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).tolist()
