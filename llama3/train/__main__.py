"""`python -m llama3.train [--config FILE] [key=value ...]`: the entry point for torchrun, e.g.

    torchrun --nproc-per-node 4 -m llama3.train --config my.toml parallel.tp=2
"""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
