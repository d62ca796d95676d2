"""Precompute the reference model's log-probs once, then train against them (TRL's ``precompute_ref_log_probs``).

    python examples/precompute_reference.py [--steps 60]

The reference pass is forward-only and reads no logits: ``fastdpo.integrations.transformers.sequence_logps``
under ``torch.no_grad()`` runs the backbone and the fused-linear kernels over tiles of scored tokens. The sums are
cached per pair; training then needs no reference model in memory. Data: ``examples/data/preferences.jsonl``.
"""

from __future__ import annotations

import argparse
import random
import sys

import tiny
import torch

import fastdpo.integrations.transformers as fastdpo_hf


def precompute(model, tokenizer, pairs, batch_pairs: int = 32) -> torch.Tensor:
    """``[len(pairs), 2]`` (chosen, rejected) summed log-probs of ``model``, one no-grad pass."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_pairs):
            batch = tiny.encode_batch(tokenizer, pairs[start : start + batch_pairs])
            out.append(torch.stack(fastdpo_hf.sequence_logps(model, batch).chunk(2), dim=1))
    return torch.cat(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=0)
    pairs = tiny.load_pairs()
    ref_logps = precompute(model, tokenizer, pairs)  # the initial model is the reference
    print(f"reference log-probs of {len(pairs)} pairs: chosen mean {ref_logps[:, 0].mean():.2f}, "
          f"rejected mean {ref_logps[:, 1].mean():.2f}")  # fmt: skip
    model.train()
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(1, args.steps + 1):
        index = rng.sample(range(len(pairs)), args.batch_pairs)
        batch = tiny.encode_batch(tokenizer, [pairs[i] for i in index])
        ref = ref_logps[index]
        out = fastdpo_hf.dpo_loss(model, batch, ref[:, 0], ref[:, 1], beta=0.1)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step % 10 == 0:
            print(f"step {step:3d}  loss {out.loss.item():.4f}  reward acc {out.reward_accuracy.item():.2f}")
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
