"""LoRA fine-tuning with Lightning over the backends' tensor-parallel model."""
