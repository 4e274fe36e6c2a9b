"""``python -m convert <model> ...``: PyTorch -> Flax checkpoint conversion.

python -m convert titok --source yucornetto/tokenizer_titok_l32_imagenet --out ckpt/titok_l32
python -m convert titok --source model.safetensors --out ckpt/titok_l32 --variant l32
"""

from __future__ import annotations

import argparse
import sys

from tokfusion_jax.errors import ArgumentParser, cli_main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per convertible model)."""
    parser = ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    t = sub.add_parser("titok", help="TiTok tokenizer: official state_dict -> Flax tokenizer dir")
    t.add_argument(
        "--source",
        required=True,
        help="model.safetensors, *.bin state_dict, a directory holding one, or a HF repo id",
    )
    t.add_argument("--out", required=True, help="output directory (written atomically)")
    t.add_argument("--config", help="official config.json (default: the one beside SRC, if any)")
    t.add_argument("--variant", help="official variant name, e.g. l32, b64, s128, bl64_vq8k")
    t.add_argument("--heads", help="attention heads: N, or ENC,DEC")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    """Entry point; errors in the input exit with status 2 and a one-line message."""
    args = build_parser().parse_args(argv)
    if args.model == "titok":
        from convert.titok import convert_titok

        convert_titok(
            args.source, args.out, config_path=args.config, variant=args.variant, heads=args.heads
        )


if __name__ == "__main__":
    main(sys.argv[1:])
