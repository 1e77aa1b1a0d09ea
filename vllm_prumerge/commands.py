"""The `vllm-prumerge` console script: one subcommand per tool (`convert` for now)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from vllm_prumerge.convert import cli as convert_cli

    parser = argparse.ArgumentParser(
        prog="vllm-prumerge",
        description="Tools of the vllm-prumerge plugin. Serving itself is "
        "`vllm serve MODEL --plugin prumerge`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    convert = commands.add_parser(
        "convert",
        help="original-format LLaVA / PruMerge LoRA checkpoints -> a llava-hf checkpoint",
        description=convert_cli.DESCRIPTION,
        epilog=convert_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert_cli.add_arguments(convert)
    convert.set_defaults(run=convert_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
