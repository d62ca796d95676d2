"""DPO with the LM head sharded over the vocabulary (tensor parallel), on CPU with gloo:

    torchrun --nproc-per-node 2 examples/tensor_parallel.py [--steps 30]

A tiny Llama built from a config (untied head); ``parallelize_module`` shards its ``lm_head`` column-wise, so each
rank computes only its slice of the vocabulary and the logits stay a ``Shard(2)`` DTensor. ``fastdpo.dpo_loss``
reads that DTensor directly: per token, each rank reduces its slice to (max, sum-exp) and the owned label's logit,
and all-reduces O(tokens) floats; the full logits are never gathered. The loss is replicated on every rank; the
backward of each shard needs no communication. Data: ``examples/data/preferences.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys

import tiny
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fastdpo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-pairs", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=0, tie=False)  # every rank builds the same weights
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for m in (model, ref_model):
        parallelize_module(m, mesh, plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, pairs, losses = random.Random(0), tiny.load_pairs(), []
    for step in range(1, args.steps + 1):
        batch = tiny.encode_batch(tokenizer, rng.sample(pairs, args.batch_pairs))  # the same batch on every rank
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**inputs).logits  # DTensor, Shard(2): this rank's [2B, T, V / world]
        with torch.no_grad():
            ref_logits = ref_model(**inputs).logits
        out = fastdpo.dpo_loss(logits, batch["labels"], ref_logits=ref_logits, beta=0.1, return_metrics=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  reward acc {out.metrics['rewards/accuracies'].item():.2f}"
                  f"  (local logits {tuple(logits.to_local().shape)}, world {world})")  # fmt: skip
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    if rank == 0:
        print(f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    dist.destroy_process_group()
    return 0 if last < first else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
