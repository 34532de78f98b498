"""The ``nxd-lora`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from nxd_lora.demo import run_demo

    run_demo(tp=args.tp, steps=args.steps, lr=args.lr, backend=args.backend, output=args.output, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nxd-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA-tune a tiny random Llama over TP ranks on this machine (no downloads)")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--lr", type=float, default=3e-2)
    demo.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--output", default="demo_output", help="directory for the rank files (default ./demo_output)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as err:
        print(f"nxd-lora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
