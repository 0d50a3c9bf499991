"""Command-line entry points (``policy-accel ...``): thin wrappers over the library."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from policy_accel.policies.loading import convert

    destination = convert(args.source, args.destination)
    print(f"wrote {destination} (policy_accel.json + model.safetensors)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-accel", description="policy_accel tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="rewrite a DiffusionPolicy .ckpt as safetensors + JSON (loads without unpickling)",
    )
    convert.add_argument("source", help="path to a .ckpt or .ckpt.xz file")
    convert.add_argument("destination", help="directory to write")
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as error:
        print(f"policy-accel {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
