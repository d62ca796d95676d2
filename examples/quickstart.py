"""fastdpo quickstart: DPO-train a tiny Llama on a synthetic preference task with ``fastdpo.dpo_loss``.

Each pair shares a random prompt; the chosen completion counts up from the prompt's last token
(t+1, t+2, ...), the rejected one is random tokens. Batches use TRL's concatenated layout (rows [0, B)
chosen, [B, 2B) rejected, right padding, labels -100 on prompt and padding). The reference model's
log-probs are precomputed once with ``fastdpo.sequence_logps``; the policy then trains with AdamW.

    pip install -e ".[examples]"
    python examples/quickstart.py [--steps 30] [--loss-type sigmoid] [--device cpu]

On CUDA the fused Triton kernels run; on CPU fastdpo falls back to its chunked PyTorch path.
Exits non-zero if the final training loss is not below the first.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastdpo

VOCAB, PAD = 512, 0
PROMPT_LEN, COMPLETION_LEN = (4, 12), (4, 10)  # inclusive ranges


def make_batch(pairs: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One concatenated DPO batch: ``input_ids``, ``attention_mask``, ``labels``, each ``[2 * pairs, T]``."""

    def randint(low: int, high: int, n: int = 1) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=gen)

    chosen, rejected = [], []
    for _ in range(pairs):
        lengths = (PROMPT_LEN, COMPLETION_LEN, COMPLETION_LEN)
        n_prompt, n_chosen, n_rejected = (int(randint(low, high + 1)) for low, high in lengths)
        # Prompt tokens stay low enough that counting up from the last one never leaves the vocab.
        prompt = randint(1, VOCAB - COMPLETION_LEN[1], n_prompt)
        chosen.append((prompt, prompt[-1] + torch.arange(1, n_chosen + 1)))
        rejected.append((prompt, randint(1, VOCAB, n_rejected)))

    rows = chosen + rejected
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), PAD)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for i, (prompt, completion) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.cat([prompt, completion])
        attention_mask[i, :n] = 1
        labels[i, n_prompt:n] = completion
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", choices=fastdpo.LOSS_TYPES, default="sigmoid")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 2 or args.batch_pairs < 1:
        parser.error("need --steps >= 2 (the check compares the first and final loss) and --batch-pairs >= 1")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    policy = LlamaForCausalLM(config).to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)

    # One fresh batch per step; reference log-probs are precomputed once, as with TRL's precompute_ref_log_probs.
    batches = [
        {k: v.to(device) for k, v in make_batch(args.batch_pairs, gen).items()} for _ in range(args.steps)
    ]
    with torch.no_grad():
        for batch in batches:
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            batch["ref_chosen"], batch["ref_rejected"] = fastdpo.sequence_logps(logits, batch["labels"]).chunk(2)

    n_params = sum(p.numel() for p in policy.parameters())
    print(f"device={device} params={n_params / 1e3:.0f}k loss_type={args.loss_type} beta={args.beta}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    policy.train()
    losses = []
    for step, batch in enumerate(batches, start=1):
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = fastdpo.dpo_loss(
            logits,
            batch["labels"],
            batch["ref_chosen"],
            batch["ref_rejected"],
            beta=args.beta,
            loss_type=args.loss_type,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(
                f"step {step:3d}  loss {losses[-1]:.4f}  "
                f"reward_acc {out.reward_accuracy.item():.2f}  reward_margin {out.reward_margin.item():+.3f}"
            )

    first, final = losses[0], losses[-1]
    if final < first:
        print(f"OK: loss went down {first:.4f} -> {final:.4f}")
        return 0
    print(f"FAIL: loss did not go down ({first:.4f} -> {final:.4f})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
