"""A plain PyTorch DPO loop on a tiny LlamaForCausalLM with fastdpo; the logits are never built.

    python examples/plain_loop.py [--steps 60] [--logits]     # --logits: model(...).logits + fastdpo.dpo_loss

The one-line switch from a logits-based loop:
    logits = model(input_ids=..., attention_mask=...).logits; out = fastdpo.dpo_loss(logits, labels, ...)
becomes
    out = fastdpo.integrations.transformers.dpo_loss(model, batch, ..., ref_model=ref_model)
which runs the backbone, then the fused-linear loss on the last hidden states and the LM head (tied here), with
the reference model scored forward-only in the same call. Data: ``examples/data/preferences.jsonl``. CPU: ~20 s.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys

import tiny
import torch

import fastdpo
import fastdpo.integrations.transformers as fastdpo_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--logits", action="store_true", help="materialise the logits and call fastdpo.dpo_loss")
    args = parser.parse_args()
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=0)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = tiny.load_pairs()
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(1, args.steps + 1):
        batch = tiny.encode_batch(tokenizer, rng.sample(pairs, args.batch_pairs))
        if args.logits:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                ref_logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out = fastdpo.dpo_loss(logits, batch["labels"], ref_logits=ref_logits, beta=0.1, return_metrics=True)
        else:
            out = fastdpo_hf.dpo_loss(model, batch, ref_model=ref_model, beta=0.1, return_metrics=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step % 10 == 0:
            m = out.metrics
            print(f"step {step:3d}  loss {out.loss.item():.4f}  reward acc {m['rewards/accuracies'].item():.2f}  "
                  f"margin {m['rewards/margins'].item():+.3f}  token acc {m['mean_token_accuracy'].item():.3f}")  # fmt: skip
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
