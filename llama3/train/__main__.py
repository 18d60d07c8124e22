"""`python -m llama3.train [--config FILE] [key=value ...]`, the entry point for torchrun:

    torchrun --nproc-per-node 4 -m llama3.train --config my.toml parallel.tp=2
"""

import argparse
import sys

from .trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3.train", description=train.__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML, JSON or YAML file with the training configuration")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings applied after the file")
    args = parser.parse_args(argv)
    try:
        train(args.overrides, config=args.config)
    except ValueError as e:  # ConfigError, DataError, WeightsError: one line, no traceback
        print(f"llama3 train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
