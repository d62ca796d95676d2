"""Drop-in integrations: ``fastdpo.integrations.transformers`` (any ``*ForCausalLM``) and
``fastdpo.integrations.trl`` (TRL's ``DPOTrainer``). Each imports its framework lazily, on first use."""
