"""Functions run on spawned ranks with NxD's own code in its CPU mode (importable by name)."""

from __future__ import annotations

import os

import torch


def use_nxd(platform: str) -> None:
    """Make this process run NxD's own code for ``platform`` (trn1|trn2)."""
    os.environ["NXD_LORA_TEST_PLATFORM"] = platform
    import harness

    harness.install()


def run_jobs(platform: str | None, jobs: list[tuple[str, tuple]], ports: list[int] | None = None) -> list:
    """Each ``(function name, args)`` of ``jobs`` in turn on this rank (functions of this module or of
    ``tp_workers``), on NxD's code for ``platform`` when given: one process start (and one NxD import)
    for several checks, since that start is most of a small check's time. Job i's process group meets
    at ``ports[i]`` (``start_jobs`` picks free ones): a rank that finished the last job early would
    otherwise join that job's store, which rank 0 may still hold, and read its stale addresses."""
    if platform:
        use_nxd(platform)
    import tp_workers

    results = []
    for index, (name, args) in enumerate(jobs):
        if ports:
            os.environ["MASTER_PORT"] = str(ports[index])
        results.append((globals().get(name) or getattr(tp_workers, name))(*args))
    return results


def start_jobs(world_size: int, platform: str | None, jobs: list[tuple[str, tuple]]) -> list[list]:
    """``run_jobs`` on ``world_size`` spawned ranks; per rank, the jobs' results."""
    from nxd_lora.local_launch import free_port, spawn_ranks

    return spawn_ranks(run_jobs, world_size, platform, jobs, [free_port() for _ in jobs])


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


def backend_setup_refusal(tp: int, kv_layout: str, config_dict: dict) -> str:
    """The error the neuron backend's set-up gives at ``tp`` in this world ('' if none)."""
    from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
    from nxd_lora.backends import get_backend

    backend = get_backend("neuron")
    try:
        backend.setup(tp, check_tensor_parallel(LlamaConfig.from_dict(config_dict), tp), kv_layout)
    except ValueError as err:
        return str(err)
    backend.teardown()
    return ""


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


def _our_model_on_nxd(base_root: str, config_dict: dict, kv_layout: str, tp: int):
    """The neuron backend set up at ``tp`` (world size / tp data-parallel replicas) and our model on
    NxD's layers, its base read by NxD's ``load_checkpoint(base_root, "pretrained_weight")``."""
    from neuronx_distributed.trainer.checkpoint import load_checkpoint

    from checkpoint_tools.llama_config import LlamaConfig, check_tensor_parallel
    from nxd_lora.backends import get_backend
    from nxd_lora.model.builder import build_model

    config = LlamaConfig.from_dict(config_dict)
    backend = get_backend("neuron")
    backend.setup(tp, check_tensor_parallel(config, tp), kv_layout)
    model = build_model(config, backend, None, None, fuse_qkv=False)
    load_checkpoint(base_root, "pretrained_weight", model=model, strict=True)
    return backend, model


def nxd_lora_model_trains_and_saves(base_root: str, config_dict: dict, kv_layout: str, input_ids: torch.Tensor,
                                    targets: list[str], saves: dict[str, dict]) -> dict:
    """What a user of NxD's own LoRA (AWS's NxD Llama LoRA tutorial) ends with: NxD's ``LoraModel``
    (rank 4, alpha 8) around our model on NxD's layers, two SGD steps on NxD's LoRA layers, then each
    ``saves[path]`` (LoraConfig fields: ``merge_sharded_lora``, ``save_lora_config_adapter``) written
    by ``nxd.save_checkpoint(path, "lora", model=lora_model)``; adapter_config.json, where not in the
    rank files, goes to ``lora_save_dir`` (set to ``path``). Returns the gathered logits after training."""
    from neuronx_distributed.modules.lora import LoraConfig, LoraModel
    from neuronx_distributed.trainer.checkpoint import save_checkpoint
    from tp_workers import train_steps

    tp = int(os.environ["WORLD_SIZE"])
    backend, model = _our_model_on_nxd(base_root, config_dict, kv_layout, tp)
    try:
        torch.manual_seed(0)  # NxD draws each rank's replicated lora_A from the same stream
        lora_model = LoraModel(model, LoraConfig(lora_rank=4, lora_alpha=8, target_modules=targets))
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        logits = train_steps(model, torch.optim.SGD(trainable, lr=0.5), input_ids, 2)
        for path, fields in saves.items():
            for name, value in dict(fields, lora_save_dir=path).items():
                setattr(lora_model.lora_config, name, value)
            lora_model.is_config_saved = False
            save_checkpoint(path, "lora", model=lora_model)
        try:  # NxD's own way back in, for the first save
            LoraModel(model, LoraConfig(load_lora_from_ckpt=True, lora_save_dir=next(iter(saves)), lora_load_tag="lora"))
            load_error = ""
        except FileNotFoundError as err:
            load_error = str(err)
        return {"logits": logits, "nxd_load_error": load_error}
    finally:
        backend.teardown()


def nxd_lora_model_reads_our_adapter(base_root: str, adapter_tag: str, input_ids: torch.Tensor) -> dict:
    """Our adapter-only save (``<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_00.pt``), read into NxD's own
    ``LoraModel`` (configured from our manifest) around our model on NxD's layers with NxD's base: the
    keys nothing filled or nothing took, and the gathered logits through NxD's LoRA layers."""
    from neuronx_distributed.modules.lora import LoraConfig, LoraModel

    from checkpoint_tools.nxd_format import rank_path, read_manifest

    manifest = read_manifest(adapter_tag)
    lora = manifest["lora"]
    backend, model = _our_model_on_nxd(base_root, manifest["config"], manifest["kv_layout"], int(manifest["tp"]))
    try:
        LoraModel(model, LoraConfig(lora_rank=lora["lora_rank"], lora_alpha=lora["lora_alpha"],
                                    use_rslora=lora["use_rslora"], target_modules=lora["target_modules"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.fill_(float("nan"))  # every adapter weight must come from our file
        state = torch.load(rank_path(adapter_tag, backend.tp_rank), map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
        with torch.no_grad():
            logits, _ = model(input_ids, gather_logits=True)
        return {"logits": logits, "unexpected": list(result.unexpected_keys),
                "lora_missing": [k for k in result.missing_keys if "lora_" in k]}
    finally:
        backend.teardown()
