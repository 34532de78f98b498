"""``nxd-lora plan``: device memory per NeuronCore (or GPU) for a recipe, before anything runs.

A trn1 NeuronCore has 16 GiB of HBM; a job that does not fit fails only after minutes of
compilation, or on every rank at once at the first step. The plan counts, per TP rank:

* base weights: this rank's shards, with K/V replicated ``kv_size_multiplier`` times and
  norms on every rank (the converter's layout, so the count is exact);
* LoRA: fp32 parameters, gradients and AdamW's two moments (16 bytes per element);
* activations kept for backward, per layer and token, from what the model's autograd
  functions save (``DecoderLayer`` and ``nxd_lora.model.ops``) under the recipe's
  ``activation_checkpointing``, plus one layer's full set while it is recomputed;
* the loss: chunked fp32 logits on eager backends, whole per-rank logits on XLA backends;
* a fixed runtime reserve (collective buffers, compiled programs, allocator slack).

Activations are an estimate (the Neuron compiler may fuse or keep more), so the plan
reports its terms and leaves a margin; weights and LoRA state are counted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
from checkpoint_tools.nxd_format import BASE_TAG, MANIFEST, manifest_config, read_manifest
from checkpoint_tools.tp_layout import check_layout_matches
from nxd_lora.instances import TrainiumInstance, layout_of_platform
from nxd_lora.lora.config import LoraConfig
from nxd_lora.model.presets import PRESETS, preset_config
from nxd_lora.parallel.loss import CHUNK_ELEMENTS
from nxd_lora.train.config import Recipe, TrainConfig

GIB = 2**30
# Device memory per rank (one NeuronCore; on trn2 a logical core of two at LNC=2, its default, or one
# physical core at LNC=1). trn3's is not recorded here: its plan is skipped with a note.
DEVICE_MEMORY_GIB = {"trn1": 16.0, "trn2": 24.0, "trn2-lnc1": 12.0, "h100": 80.0, "h200": 141.0}
RUNTIME_RESERVE_GIB = 1.5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanDoesNotFit(ValueError):
    """The recipe needs more memory per rank than the device has."""


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    device_gib: float
    tp: int
    kv_size_multiplier: int
    terms_gib: dict[str, float]

    @property
    def total_gib(self) -> float:
        return sum(self.terms_gib.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.device_gib

    def report(self) -> str:
        lines = [f"memory per rank on {self.device} ({self.device_gib:g} GiB), tp={self.tp}, "
                 f"kv_size_multiplier={self.kv_size_multiplier}:"]
        lines += [f"  {name:<28} {gib:8.2f} GiB" for name, gib in self.terms_gib.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<28} {self.total_gib:8.2f} GiB  -> {verdict} "
                     f"({100 * self.total_gib / self.device_gib:.0f}% of {self.device_gib:g} GiB)")
        return "\n".join(lines)


def base_weight_elements(config: LlamaConfig, tp: int, kvm: int) -> int:
    """Elements of one rank's base shard (exact: the converter's layout)."""
    h, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows = config.num_attention_heads * hd // tp
    kv_rows = config.num_key_value_heads * kvm * hd // tp
    per_layer = h * (2 * q_rows + 2 * kv_rows) + 3 * h * f // tp + 2 * h
    vocab = config.vocab_size // tp * h * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + vocab + h


def lora_elements(config: LlamaConfig, lora: LoraConfig, tp: int, kvm: int) -> int:
    """Elements of one rank's adapter (replicated A or B counted in full, as each rank holds them)."""
    h, hd, f, r = config.hidden_size, config.head_dim, config.intermediate_size, lora.lora_rank
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd * kvm
    per_target = {
        "qkv_proj": r * h + r * (q_out + 2 * kv_out) // tp,     # A replicated, B sharded like the base
        "o_proj": r * q_out // tp + h * r,                      # row-parallel: A sharded, B replicated
        "gate_up_proj": r * h + r * 2 * f // tp,
        "down_proj": r * f // tp + h * r,
    }
    return config.num_hidden_layers * sum(per_target[t] for t in lora.target_modules)


def activation_bytes_per_token(config: LlamaConfig, lora: LoraConfig, tp: int, kvm: int, dtype_bytes: int,
                               mode: str) -> tuple[float, float]:
    """(bytes kept per token per layer for backward, bytes of one layer's full set while recomputed).

    The hidden state is whole on every rank (no sequence parallelism); projections are sharded.
    LoRA's ``lora_A`` keeps its input: in the model dtype for a replicated ``lora_A``
    (column-parallel bases) without dropout, else as the fp32 copy, plus the dropout mask
    (fp32 on CPU and XLA, where dropout multiplies by a float mask; one byte on CUDA), see
    ``nxd_lora.lora.layers``.
    """
    h, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    targets = set(lora.target_modules)
    q, kv, o = config.num_attention_heads * hd // tp, config.num_key_value_heads * kvm * hd // tp, \
        config.num_attention_heads * hd // tp
    if lora.lora_dropout > 0:  # dropout's fp32 output and its fp32 mask
        column_input = row_input = 4 + 4
    else:  # the input itself for a replicated lora_A, its fp32 copy for a sharded one
        column_input, row_input = dtype_bytes, 4
    attention = dtype_bytes * (h + q + 2 * kv + o)              # norm input, q/k/v and output kept by SDPA
    attention += column_input * h * ("qkv_proj" in targets) + row_input * o * ("o_proj" in targets)
    mlp = dtype_bytes * (h + 2 * f // tp)                       # norm input, gate_up kept by SwiGLU
    mlp += column_input * h * ("gate_up_proj" in targets) + row_input * (f // tp) * ("down_proj" in targets)
    layer = attention + mlp
    kept = {"none": layer, "mlp": attention + dtype_bytes * h, "full": dtype_bytes * h}[mode]
    return float(kept), float(layer if mode != "none" else 0)


def plan_memory(config: LlamaConfig, lora: LoraConfig, tp: int, seq_len: int, micro_batch_size: int,
                activation_checkpointing: str = "none", dtype: str = "bfloat16", device: str = "trn1",
                whole_logits: bool = True) -> MemoryPlan:
    """The per-rank memory plan; ``whole_logits`` for backends that materialise each rank's logits."""
    if device not in DEVICE_MEMORY_GIB:
        raise ValueError(f"unknown device {device!r}; choose from {sorted(DEVICE_MEMORY_GIB)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model.dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    kvm = check_tensor_parallel(config, tp)
    nbytes = DTYPE_BYTES[dtype]
    tokens = seq_len * micro_batch_size
    kept, recompute = activation_bytes_per_token(config, lora, tp, kvm, nbytes, activation_checkpointing)
    vocab_local = config.vocab_size // tp
    if whole_logits:  # logits in the model dtype, fp32 softmax kept for backward
        loss = tokens * vocab_local * (nbytes + 4)
    else:  # one chunk of fp32 logits, the hidden-state gradient of every token
        loss = min(tokens * vocab_local, CHUNK_ELEMENTS) * 4 + tokens * config.hidden_size * nbytes
    terms = {
        "base weights": base_weight_elements(config, tp, kvm) * nbytes,
        "LoRA params+grads+AdamW": lora_elements(config, lora, tp, kvm) * 16,
        f"activations ({activation_checkpointing})": tokens * (kept * config.num_hidden_layers + recompute),
        "loss (logits)": loss,
        "embeddings, hidden grads": 3 * tokens * config.hidden_size * nbytes,
    }
    gib = {name: value / GIB for name, value in terms.items()}
    gib["runtime reserve"] = RUNTIME_RESERVE_GIB
    return MemoryPlan(device, DEVICE_MEMORY_GIB[device], tp, kvm, gib)


def architecture_config(recipe: Recipe) -> tuple[LlamaConfig, str]:
    """``model.architecture`` (a preset name or a config.json path) as a config, and where from."""
    arch = recipe.model.architecture
    if arch in PRESETS:
        return preset_config(arch), f"preset {arch}"
    if arch and Path(arch).exists():
        return LlamaConfig.from_json(arch), arch
    raise ValueError(f"model.architecture={arch!r} is neither a known architecture {sorted(PRESETS)} "
                     "nor an existing config.json")


def recipe_model_config(recipe: Recipe) -> tuple[LlamaConfig, str]:
    """The recipe's architecture: the converted checkpoint's manifest when it exists, else
    ``model.architecture``. Returns (config, where from)."""
    manifest_path = Path(recipe.model.checkpoint) / BASE_TAG / MANIFEST if recipe.model.checkpoint else None
    if manifest_path is not None and manifest_path.is_file():
        tag = manifest_path.parent
        return manifest_config(read_manifest(tag), tag), str(manifest_path)
    if not recipe.model.architecture:
        raise ValueError(f"no converted checkpoint at model.checkpoint={recipe.model.checkpoint!r} and no "
                         f"model.architecture: set one of them (architectures: {sorted(PRESETS)} or a config.json)")
    return architecture_config(recipe)


def device_for_backend(backend: str) -> str:
    return {"neuron": "trn1", "torchneuron": "trn2", "cuda": "h100"}.get(backend, "trn1")


def device_of_platform(platform: str, lnc: int | None = None) -> str:
    """The plan's device for a Trainium platform at logical-core config ``lnc`` (trn2: 2 unless 1)."""
    return "trn2-lnc1" if platform == "trn2" and lnc == 1 else platform


def device_of_instance(instance: TrainiumInstance, lnc: int | None = None) -> str:
    return device_of_platform(instance.platform, instance.lnc(lnc))


def plan_recipe(recipe: Recipe, device: str | None = None, config: LlamaConfig | None = None) -> MemoryPlan:
    """The plan of ``recipe`` on ``config`` (default: the recipe's own, see ``recipe_model_config``)."""
    config = config or recipe_model_config(recipe)[0]
    train = recipe.train
    return plan_memory(config, recipe.lora, train.tp, recipe.data.seq_len, train.micro_batch_size,
                       train.activation_checkpointing, recipe.model.dtype,
                       device or device_for_backend(train.backend),
                       whole_logits=train.backend in ("neuron", "xla"))


def check_plan_fits(plan: MemoryPlan, source: str) -> None:
    if not plan.fits:
        raise PlanDoesNotFit(
            f"{source}: needs {plan.total_gib:.2f} GiB per rank, more than the {plan.device_gib:g} GiB of a "
            f"{plan.device} rank. Try train.activation_checkpointing=full (or mlp), a smaller "
            f"train.micro_batch_size or data.seq_len, or a larger train.tp.\n{plan.report()}")


ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_architecture(expected: LlamaConfig, found: LlamaConfig, source: str) -> None:
    """The recipe's ``model.architecture`` must be the converted checkpoint's: a recipe sized
    (and planned) for one model must not silently train another."""
    differ = [f"{name}: {getattr(expected, name)} vs {getattr(found, name)}"
              for name in ARCHITECTURE_FIELDS if getattr(expected, name) != getattr(found, name)]
    if differ:
        raise ValueError(f"{source}: the checkpoint is a different model ({'; '.join(differ)})")


def check_parallel_layout(cfg: TrainConfig, world_size: int, source: str = "recipe") -> int:
    """``train.tp`` x data-parallel replicas must be the world size; returns the DP size."""
    if cfg.tp < 1 or world_size % cfg.tp:
        raise ValueError(f"{source}: train.tp={cfg.tp} does not divide the world size {world_size}")
    dp = world_size // cfg.tp
    if cfg.dp and cfg.dp != dp:
        raise ValueError(f"{source}: train.tp={cfg.tp} x train.dp={cfg.dp} = {cfg.tp * cfg.dp} ranks, "
                         f"but the launcher started {world_size}")
    return dp


def check_layout_for_device(recipe: Recipe, config: LlamaConfig, device: str, source: str) -> str | None:
    """On a Trainium ``device``, the KV layout the recipe expects (``model.kv_layout``) and the one its
    converted checkpoint has (when it exists here) must be that device's where it matters (tp > KV
    heads). Returns the layout the job needs, or None off Trainium."""
    platform = device.split("-")[0]
    if platform not in ("trn1", "trn2", "trn3"):
        return None
    layout = layout_of_platform(platform)
    kvm = check_tensor_parallel(config, recipe.train.tp)
    if recipe.model.kv_layout:
        check_layout_matches(recipe.model.kv_layout, layout, recipe.train.tp, kvm,
                             f"{source} (model.kv_layout on {platform})")
    tag = Path(recipe.model.checkpoint) / BASE_TAG if recipe.model.checkpoint else None
    if tag is not None and (tag / MANIFEST).is_file():
        check_layout_matches(read_manifest(tag).get("kv_layout", "trn1"), layout, recipe.train.tp, kvm,
                             f"{tag} (on {platform})")
    return layout


def check_job(recipe: Recipe, config: LlamaConfig, world_size: int, source: str, device: str | None = None) -> int:
    """What a job's recipe must agree with before it starts: ``config`` (the model it will train)
    has ``model.architecture``, ``train.tp`` x ``train.dp`` is ``world_size``, and with a
    ``device`` the memory plan fits it. Returns the data-parallel size."""
    if recipe.model.architecture:
        check_architecture(architecture_config(recipe)[0], config,
                           f"model.architecture={recipe.model.architecture!r} vs {source}")
    dp = check_parallel_layout(recipe.train, world_size, source)
    if device:
        check_layout_for_device(recipe, config, device, source)
        if device in DEVICE_MEMORY_GIB:
            check_plan_fits(plan_recipe(recipe, device, config), source)
        else:
            print(f"[plan] note: no memory per core is recorded for {device}; the memory plan is skipped", flush=True)
    return dp
