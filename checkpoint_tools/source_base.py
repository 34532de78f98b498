"""What every checkpoint source shares: the error type, the ``Source`` interface, owned slices and
the Meta <-> HF rope row permutation (Meta and GGUF both store q/k in Meta's interleaved order).

Split from ``sources`` so that the source modules (``gguf_source``, ``nxd_source``) build on it
while ``sources.open_source`` imports them: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint_tools.llama_config import LlamaConfig


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, unreadable or not what the config says."""


@dataclass
class Source:
    """Common interface: HF-named keys with full shapes and dtypes, sliced reads."""

    path: Path
    format: str
    config: LlamaConfig
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def read(self, key: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop cached handles so mapped file pages stop counting against this process."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weight matrices (norms are sometimes stored in fp32)."""
        return self.dtypes.get("model.embed_tokens.weight", torch.float32)


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it owns exactly its storage and is contiguous, else a compact copy.

    Slices from safetensors and mmap-loaded files are views over the whole mapped tensor;
    keeping them would keep the mapping alive, and ``torch.save`` would write all of it.
    """
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def meta_to_hf_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved (re, im) rows per head -> HF's rotate-half order (whole heads only)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``meta_to_hf_rope_rows``."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
