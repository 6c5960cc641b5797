"""Pretrain a GPT from a recipe: `torchrun --nproc_per_node=N pretrain_gpt.py --recipe NAME [key=value ...]`."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
