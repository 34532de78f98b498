"""Tiny GGUF files written the way llama.cpp's converter writes Llama (q/k rows in Meta's
interleaved rope order, reversed dims), with ``gguf``'s own writer and quantizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from checkpoint_tools.sources import hf_to_meta_rope_rows

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_key: str) -> str:
    if hf_key in HF_TO_GGUF:
        return HF_TO_GGUF[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    return f"blk.{layer}.{LAYER_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(path: Path, config: dict, state: dict[str, torch.Tensor], qtype: str = "F32",
                     arch: str = "llama", extra_tensors: dict[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """``state``: HF keys. Matrices are stored as ``qtype`` (norms stay F32, as llama.cpp keeps them)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for key, tensor in state.items():
        leaf = key.split(".")[-2]
        if leaf in heads:
            tensor = hf_to_meta_rope_rows(tensor, heads[leaf])
        array = tensor.float().numpy()
        kind = T[qtype] if array.ndim == 2 else T.F32
        data = array if kind == T.F32 else quantize(array, kind)
        writer.add_tensor(gguf_name(key), data, raw_dtype=kind)
    for name, (data, kind) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
