"""Llama checkpoint formats: HF/Meta <-> NxD TP shards and PEFT export (torch + safetensors only)."""
