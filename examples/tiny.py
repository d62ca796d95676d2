"""What the examples (and the end-to-end tests) share: the shipped preference data, a character-level
tokenizer built in code, and a tiny Llama built from a config. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parent / "data" / "preferences.jsonl"
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = " :0123456789abcdefghijklmnopqrstuvwxyz"


def load_pairs(path: Path = DATA) -> list[dict[str, str]]:
    """``[{"prompt", "chosen", "rejected"}, ...]`` (regenerate with ``python examples/make_preferences.py``)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus pad/bos/eos/unk."""
    vocab = {token: i for i, token in enumerate((*SPECIAL, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")  # fmt: skip


def make_model(tokenizer, *, seed: int = 0, tie: bool = True, dtype=torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama (~100k parameters) for ``tokenizer``; ``tie`` ties the LM head to the embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tie)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def encode_batch(tokenizer, pairs: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """TRL's concatenated batch of ``pairs``: rows [0, B) prompt + chosen + eos, [B, 2B) prompt + rejected + eos,
    right-padded; ``labels`` are the input ids with -100 on prompt and padding."""
    rows = []
    for key in ("chosen", "rejected"):
        for pair in pairs:
            prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(pair[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt, completion))
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
