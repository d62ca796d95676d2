"""TRL's DPOTrainer with fastdpo's kernels: the one-line switch is the import.

    python examples/trl_dpo.py [--steps 60] [--trl] [--precompute-ref]     # --trl: TRL's own DPOTrainer, for comparison

Trains a tiny Llama (built from a config, tied LM head) on the shipped preference data
(``examples/data/preferences.jsonl``) with a character-level tokenizer built in code: nothing is downloaded.
Every DPOConfig option, metric and reference-model mode is TRL's; fastdpo computes the per-token log-probs from
the last hidden states and the LM head (``fastdpo.integrations.trl``). CPU: about half a minute.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import tiny
from datasets import Dataset
from trl import DPOConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trl", action="store_true", help="TRL's own DPOTrainer instead of fastdpo's")
    parser.add_argument("--precompute-ref", action="store_true", help="DPOConfig(precompute_ref_log_probs=True)")
    args = parser.parse_args()
    if args.trl:
        from trl import DPOTrainer
    else:
        from fastdpo.integrations.trl import DPOTrainer  # the switch: this line instead of the one above

    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=0)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
                           beta=0.1, logging_steps=10, report_to="none", save_strategy="no", seed=0,
                           precompute_ref_log_probs=args.precompute_ref, use_cpu=True, bf16=False)  # fmt: skip
        # A model built from a config has no hub id for TRL to load the reference from: pass a frozen copy.
        ref_model = None if args.precompute_ref else copy.deepcopy(model)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config,
                             train_dataset=Dataset.from_list(tiny.load_pairs()), processing_class=tokenizer)  # fmt: skip
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"{'trl' if args.trl else 'fastdpo'}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
