"""Small collectives shared by the vocab-parallel and context-parallel paths: the process group of a ``*_group``
argument, where host-built tensors live for a group's backend, and an all-gather of a few integers per rank (layout
checks)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def process_group(group, name: str):
    """The process group of a ``*_group`` argument: a 1-D ``DeviceMesh`` stands for its group (as the fused-linear
    path's DTensor head already allowed); a mesh of more dimensions is refused, naming the argument, since which
    of its dimensions is meant cannot be guessed. Anything else is returned as is."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch built without distributed
        return group
    if not isinstance(group, DeviceMesh):
        return group
    if group.ndim != 1:
        raise ValueError(
            f"{name} must be a process group or a 1-D DeviceMesh, got a {group.ndim}-D mesh "
            f"{tuple(group.shape)}; pass the sub-mesh of the sharded dimension (e.g. mesh['tp'])"
        )
    return group.get_group()


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
