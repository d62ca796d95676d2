"""Drop-in integrations on real (tiny) models: transformers causal LMs without their logits, TRL's DPOTrainer
with fastdpo inside (same losses and metrics as TRL's own trainer, step by step), and DDP (gloo, 2 processes)."""

import copy
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import fastdpo
from fastdpo.integrations import transformers as hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny  # noqa: E402  (examples/tiny.py: tokenizer, model and data shared with the examples)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    """Whole-model runs use the chunked PyTorch path: the interpreted kernels are covered by the unit tests and
    take minutes on a model's worth of tokens."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")


def _batch(n_pairs=4, start=0):
    return tiny.encode_batch(tiny.make_tokenizer(), tiny.load_pairs()[start : start + n_pairs])


def _param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_causal_lm_loss_equals_logits_path(tie):
    """``integrations.transformers.dpo_loss(model, batch)`` (no logits) equals ``dpo_loss(model(...).logits)``,
    and so do the gradients of every parameter, the LM head (tied or not) included."""
    model = tiny.make_model(tiny.make_tokenizer(), tie=tie)
    batch = _batch()
    refs = torch.randn(2, 4) - 40
    fused = hf.dpo_loss(model, batch, *refs, beta=0.3, return_metrics=True)
    fused.loss.backward()
    fused_grads = _param_grads(model)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    direct = fastdpo.dpo_loss(logits, batch["labels"], *refs, beta=0.3, return_metrics=True)
    direct.loss.backward()
    torch.testing.assert_close(fused.loss, direct.loss, rtol=1e-5, atol=1e-6)
    for name in ("entropy", "logits/chosen", "mean_token_accuracy"):
        torch.testing.assert_close(fused.metrics[name], direct.metrics[name], rtol=1e-5, atol=1e-6)
    for name, grad in _param_grads(model).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_softcapped_gemma_reads_the_config():
    """Gemma 2 applies ``final_logit_softcapping`` inside its forward; the fused path reads it from the config."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny.make_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                          pad_token_id=tok.pad_token_id)  # fmt: skip
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well past the cap, so a missing softcap cannot pass
    batch = _batch()
    assert hf.logit_transform(model.config) == {"logit_scale": 1.0, "final_logit_softcapping": 2.0}
    with torch.no_grad():
        fused = hf.sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        direct = fastdpo.sequence_logps(logits, batch["labels"])
    torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-4)


def test_logit_transform_like_trl():
    from transformers import CohereConfig, GraniteConfig

    assert hf.logit_transform(CohereConfig(logit_scale=0.25))["logit_scale"] == 0.25
    assert hf.logit_transform(GraniteConfig(logits_scaling=8.0))["logit_scale"] == 0.125


def _train(trainer_cls, steps, **config):
    from datasets import Dataset
    from trl import DPOConfig

    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok, seed=0)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
                         logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True,
                         disable_tqdm=True, bf16=False, **config)  # fmt: skip
        ref = None if config.get("precompute_ref_log_probs") else copy.deepcopy(model)
        trainer = trainer_cls(model=model, ref_model=ref, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(tiny.load_pairs()))  # fmt: skip
        trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "grad_norm")  # fmt: skip


@pytest.mark.parametrize("config", [dict(use_weighting=True), dict(precompute_ref_log_probs=True, loss_type=["sigmoid", "sft"],
                                                 loss_weights=[1.0, 0.3])],
                         ids=["ref-model-wpo", "precomputed-ref-mix"])  # fmt: skip
def test_trl_trainer_matches_trl_step_by_step(config, monkeypatch):
    """The same seeds, data and tiny model trained with TRL's DPOTrainer and with fastdpo's: every logged loss and
    metric agrees at every step (float32), fastdpo's kernels did run, and the loss goes down."""
    import trl

    from fastdpo.integrations import trl as fastdpo_trl

    calls = []
    apply = fastdpo_trl.FusedLMHeadLogProbs.apply
    monkeypatch.setattr(fastdpo_trl.FusedLMHeadLogProbs, "apply",
                        staticmethod(lambda *a, **k: calls.append(1) or apply(*a, **k)))  # fmt: skip
    steps = 20
    theirs = _train(trl.DPOTrainer, steps, **config)
    assert not calls  # TRL's own trainer is untouched by the integration
    ours = _train(fastdpo_trl.DPOTrainer, steps, **config)
    assert len(calls) >= steps and len(ours) == len(theirs) == steps
    for step, (a, b) in enumerate(zip(theirs, ours), start=1):
        for name in METRICS:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (step, name)
    losses = [log["loss"] for log in ours]
    assert sum(losses[-5:]) < sum(losses[:5])


def _ddp_worker(rank: int, world: int, store: str, result: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    os.environ["FASTDPO_BACKEND"] = "torch"
    model = tiny.make_model(tiny.make_tokenizer(), seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(hf.DPOLossWrapper(model, beta=0.5))
    batch = _batch(n_pairs=2, start=2 * rank)  # each rank: its own 2 pairs
    refs = torch.arange(8, dtype=torch.float32).view(2, 4)[:, 2 * rank : 2 * rank + 2] - 50
    ddp(*refs, **batch).loss.backward()
    if rank == 0:
        torch.save(_param_grads(model), result)
    dist.barrier()  # no rank tears its group down while another still talks
    # Free DDP's reducer while the group is registered: freed after destroy_process_group, the reducer holds the
    # group's last reference and its destructor joins a gloo thread that waits for the GIL (a hang, 1 run in ~10).
    del ddp
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    """Each rank's loss is the mean over its local pairs (as in TRL); DDP averages the gradients, which equals the
    single-process gradient of the mean over all pairs."""
    import torch.multiprocessing as mp

    result = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    ddp_grads = torch.load(result)
    model = tiny.make_model(tiny.make_tokenizer(), seed=0)
    batch = _batch(n_pairs=4)
    refs = torch.arange(8, dtype=torch.float32).view(2, 4) - 50
    # the padded lengths differ from the per-rank batches: right padding does not change the result
    hf.dpo_loss(model, batch, *refs, beta=0.5).loss.backward()
    single = _param_grads(model)
    assert ddp_grads.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unsupported_trl_fails_loudly(monkeypatch):
    """A TRL whose DPOTrainer does not use the fused LM head (TRL < 1.15) is refused at construction."""
    import trl.trainer.dpo_trainer as dpo

    from fastdpo.integrations import trl as fastdpo_trl

    monkeypatch.delattr(dpo, "add_fused_lm_head")
    with pytest.raises(ImportError, match=r"trl >= 1.15.*trl \d"):
        fastdpo_trl.DPOTrainer(model=None)


@pytest.mark.parametrize("config", [dict(), dict(precompute_ref_log_probs=True)], ids=["ref-model", "precomputed"])
def test_trl_padding_free_equals_padded(config, monkeypatch):
    """``padding_free=True`` (which TRL 1.16's DPO ignores) packs each batch into one row for the policy and the
    reference; losses and metrics equal the padded run's at every step."""
    from fastdpo.integrations import trl as fastdpo_trl

    rows = []
    call = fastdpo_trl.PackedModel.__call__

    def spy(self, **kw):
        out = call(self, **kw)
        rows.append(out.log_probs.shape[0] if kw.get("fused_lm_head") else None)
        return out

    monkeypatch.setattr(fastdpo_trl.PackedModel, "__call__", spy)
    padded = _train(fastdpo_trl.DPOTrainer, 8, **config)
    assert not rows
    packed = _train(fastdpo_trl.DPOTrainer, 8, padding_free=True, **config)
    assert rows and all(r == 16 for r in rows)  # outputs back in the padded [2B, T - 1] layout
    for step, (a, b) in enumerate(zip(padded, packed), start=1):
        for name in METRICS:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (step, name)


def _small(**overrides):
    return dict(vocab_size=len(tiny.make_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, **overrides)  # fmt: skip


def _sliding_models(window):
    """A model that slides in every layer (Mistral, no layer types) and one mixing full and sliding layers (Gemma 2)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return [MistralForCausalLM(MistralConfig(**_small(sliding_window=window))),
            Gemma2ForCausalLM(Gemma2Config(**_small(sliding_window=window, head_dim=16)))]  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_mask_gives_each_sequence_its_padded_outputs(attn):
    """One packed row with fastdpo's mask gives each sequence exactly its padded-row outputs, under sdpa and eager
    attention (eager adds the mask to the scores: a boolean mask masked nothing there), for a plain model and for
    sliding-window models whose window is shorter than the sequences (windowed in every layer, or per layer type)."""
    from fastdpo.integrations.trl import _packed_attention_mask

    batch = _batch(n_pairs=3)
    keep = batch["attention_mask"].bool()
    assert int(keep.sum(1).min()) > 6  # the window below cuts into every sequence
    position_ids = (keep.cumsum(1) - 1)[keep].unsqueeze(0)
    for model in [tiny.make_model(tiny.make_tokenizer()), *_sliding_models(window=6)]:
        if attn == "sdpa" and not model._supports_sdpa:  # Gemma 2: eager only
            continue
        model.eval().set_attn_implementation(attn)
        with torch.no_grad():
            padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
            mask = _packed_attention_mask(model.config, keep, model.dtype)
            packed = model(input_ids=batch["input_ids"][keep].unsqueeze(0), position_ids=position_ids,
                           attention_mask=mask).logits[0]  # fmt: skip
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5, msg=type(model).__name__)


def test_packed_model_refuses_a_router_loss_without_flash_attention():
    """A MoE router loss is computed from the attention mask (a 2-D one, in TRL): packed, it raises."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from fastdpo.integrations.trl import PackedModel

    model = MixtralForCausalLM(MixtralConfig(**_small(num_local_experts=2, num_experts_per_tok=1,
                                                      output_router_logits=True)))  # fmt: skip
    with pytest.raises(ValueError, match="router"):
        PackedModel(model)(**_batch(n_pairs=2), fused_lm_head=True)


def test_trainer_reads_padding_free_from_a_positional_config():
    """TRL's signature is (model, ref_model, args, ...): a config passed positionally is the third argument."""
    from datasets import Dataset
    from trl import DPOConfig

    from fastdpo.integrations import trl as fastdpo_trl

    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, report_to="none", use_cpu=True, bf16=False, padding_free=True)
        trainer = fastdpo_trl.DPOTrainer(model, copy.deepcopy(model), args, processing_class=tok,
                                         train_dataset=Dataset.from_list(tiny.load_pairs()[:4]))  # fmt: skip
    assert trainer.fastdpo_packed


def test_packed_model_under_a_ddp_like_wrapper_reads_the_inner_config():
    """The trainer may hand compute_loss a DDP-wrapped model (no .config of its own)."""
    from fastdpo.integrations.trl import _unwrapped

    model = tiny.make_model(tiny.make_tokenizer())

    class Wrapper(torch.nn.Module):  # DistributedDataParallel's shape: the model at .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert _unwrapped(Wrapper(Wrapper(model))) is model and _unwrapped(model) is model


def test_peft_like_model_is_read_through_its_base_model():
    """A PEFT model's ``base_model`` is the adapter wrapper (its forward is the whole causal LM): the hidden states
    come from ``get_base_model()``'s backbone, so the loss equals the plain model's."""
    model = tiny.make_model(tiny.make_tokenizer())

    class Adapters(torch.nn.Module):  # peft's LoraModel: holds the model, forwards to all of it
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, **kwargs):
            return self.model(**kwargs)

    class PeftLike(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model, self.config = Adapters(inner), inner.config

        def get_base_model(self):
            return self.base_model.model

        def get_output_embeddings(self):
            return self.base_model.model.get_output_embeddings()

    batch = _batch(n_pairs=2)
    with torch.no_grad():
        torch.testing.assert_close(hf.sequence_logps(PeftLike(model), batch), hf.sequence_logps(model, batch))
