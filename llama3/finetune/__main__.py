"""`python -m llama3.finetune [--model M] [--data FILE] [--method full|lora|qlora] [--dpo] [key=value ...]`, the
entry point for torchrun:

    torchrun --nproc-per-node 2 -m llama3.finetune --data chats.jsonl --method full training.batch_size=16
"""

import argparse
import sys
import typing

from . import finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3.finetune", description=finetune.__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--method", choices=typing.get_args(typing.get_args(
        typing.get_type_hints(finetune)["method"])[0]))
    parser.add_argument("--dpo", action="store_true")
    parser.add_argument("--config")
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings applied after the file")
    args = vars(parser.parse_args(argv))
    try:
        finetune(args.pop("overrides"), **args)
    except ValueError as e:  # ConfigError, DataError, WeightsError, AdapterError: one line, no traceback
        print(f"llama3 finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
