"""Functions run on spawned ranks with NxD's own code in its CPU mode (importable by name)."""

from __future__ import annotations

import os

import torch


def use_nxd(platform: str) -> None:
    """Make this process run NxD's own code for ``platform`` (trn1|trn2)."""
    os.environ["NXD_LORA_TEST_PLATFORM"] = platform
    import harness

    harness.install()


def run_jobs(platform: str | None, jobs: list[tuple[str, tuple]]) -> list:
    """Each ``(function name, args)`` of ``jobs`` in turn on this rank (functions of this module or of
    ``tp_workers``), on NxD's code for ``platform`` when given: one process start (and one NxD import)
    for several checks, since that start is most of a small check's time."""
    if platform:
        use_nxd(platform)
    import tp_workers

    return [(globals().get(name) or getattr(tp_workers, name))(*args) for name, args in jobs]


def train_command(overrides: list[str]) -> dict:
    """What ``nxd-lora train`` runs on each rank."""
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    os.environ["NXD_LORA_NO_BAR"] = "1"
    return train(load_recipe(None, overrides))


def nxd_loads_base(root: str, config_dict: dict, fuse_qkv: bool, kv_layout: str, input_ids: torch.Tensor) -> dict:
    """Our model on NxD's layers, its weights read by NxD's own ``load_checkpoint(root, "pretrained_weight",
    strict=True)`` (from our converter's output or NxD's); the gathered logits."""
    from neuronx_distributed.trainer.checkpoint import load_checkpoint

    from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
    from nxd_lora.backends import get_backend
    from nxd_lora.model.builder import build_model

    config = LlamaConfig.from_dict(config_dict)
    tp = int(os.environ["WORLD_SIZE"])
    backend = get_backend("neuron")
    backend.setup(tp, check_tensor_parallel(config, tp), kv_layout)
    try:
        model = build_model(config, backend, None, None, fuse_qkv=fuse_qkv)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))  # every weight must come from the checkpoint
        load_checkpoint(root, "pretrained_weight", model=model, strict=True)
        with torch.no_grad():
            logits, _ = model(input_ids, gather_logits=True)
        return {"logits": logits, "keys": sorted(model.state_dict())}
    finally:
        backend.teardown()


def nxd_fused_qkv_backward(fuse_qkv: bool) -> str:
    """Backward through NxD's own GQA layer with its weights frozen (the base of a LoRA run), TP 1:
    'ok', or the error NxD raises."""
    import torch.distributed as dist
    from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
    from neuronx_distributed.parallel_layers import parallel_state

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        layer = GQAQKVColumnParallelLinear(16, [16, 8], bias=False, gather_output=False, fuse_qkv=fuse_qkv)
        layer.requires_grad_(False)
        x = torch.randn(2, 3, 16, requires_grad=True)  # a later layer's input: its gradient is needed
        q, k, v = layer(x)
        try:
            (q.sum() + k.sum() + v.sum()).backward()
        except TypeError as err:
            return f"TypeError: {err}"
        return "ok"
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def refusal_before_start(overrides: list[str]) -> str:
    """The error ``nxd-lora train`` gives before any work for this recipe ('' if none)."""
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import check_before_start

    try:
        check_before_start(load_recipe(None, overrides))
    except ValueError as err:
        return str(err)
    return ""


def recorded_signature_mismatches() -> list[str]:
    """Where ``tests/nxd_standins.py``'s recorded NxD signatures differ from NxD's real ones (names and
    defaults), in a process that imports NxD through the harness."""
    import importlib

    import nxd_standins

    mismatches = []
    for module_name, stubs in nxd_standins.RECORDED.items():
        module = importlib.import_module(module_name)
        for stub in stubs:
            real = nxd_standins.real_signature(getattr(module, stub.__name__))
            recorded = nxd_standins.recorded_signature(stub)
            got = [(p.name, p.default) for p in real.parameters.values()]
            want = [(p.name, p.default) for p in recorded.parameters.values()]
            if got != want:
                mismatches.append(f"{module_name}.{stub.__name__}: NxD {got} != recorded {want}")
    return mismatches
