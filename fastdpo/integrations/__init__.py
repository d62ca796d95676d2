"""Drop-in integrations: ``fastdpo.integrations.transformers`` (any ``*ForCausalLM``), ``fastdpo.integrations.trl``
(TRL's ``DPOTrainer``) and ``fastdpo.integrations.liger`` (Liger-Kernel's ``LigerFusedLinearDPOLoss``, which needs
no Liger installed). Each imports its framework lazily, on first use."""
