"""`python -m llama3.finetune [--model M] [--data FILE] [--method full|lora|qlora] [--dpo] [key=value ...]`, the
entry point for torchrun, e.g.

    torchrun --nproc-per-node 2 -m llama3.finetune --data chats.jsonl --method full training.batch_size=16
"""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
