"""Pretrain a GPT from a recipe: `torchrun --nproc_per_node=N pretrain_gpt.py --recipe NAME [key=value ...]`."""

from pretrain.cli import main
from upstream.process import exit_quickly

if __name__ == "__main__":
    exit_quickly(main())
