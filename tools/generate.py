"""Generate text from one of our checkpoints, streamed as it is sampled.

    python -m tools.generate --checkpoint runs/quickstart/checkpoints --prompt "def main(" \
        [--max-new-tokens 64] [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--seed 1234]
    torchrun --nproc_per_node=4 -m tools.generate --tensor 2 --pipeline 2 --checkpoint ... --prompt ...

CHECKPOINT is a checkpoint folder (its `latest` is used) or one `iter_N`, saved at any layout;
the recipe stored in it gives the architecture and the tokenizer (`--tokenizer` for a checkpoint
imported from Hugging Face, whose recipe names none). `--temperature 0` is greedy decoding. The
text stops at the tokenizer's end-of-document token or after `--max-new-tokens`. Under torchrun the
processes split the model by `--tensor` × `--pipeline` (their product is the number of processes)
and rank 0 prints. The model is built in fp32 whatever precision it trained in (a bf16 checkpoint
is upcast as it loads: 4 bytes per parameter over the processes). Bad input is one `error:` line,
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

from common.errors import UserError, run_tool
from upstream.process import exit_quickly


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path, help="checkpoint folder or iter_N")
    parser.add_argument("--prompt", required=True, help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the ids holding p of the mass")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer", help="instead of the recipe's data.tokenizer (imported checkpoints)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (under torchrun)")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size (under torchrun)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The options' bounds, before anything is loaded."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or positive, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    filters = [f"--top-k {args.top_k}"] * bool(args.top_k) + [f"--top-p {args.top_p}"] * (args.top_p < 1.0)
    if args.temperature == 0 and filters:
        raise UserError(
            f"{' and '.join(filters)} filter sampling, which --temperature 0 (greedy: the most likely id) does "
            "not do: leave them out, or give a temperature above 0"
        )
    # The checkpoint's path is checked where it is read (pretrain/checkpoint/storage.py), as by every tool.


def read_checkpoint(path: pathlib.Path) -> tuple[pathlib.Path, Any, str, int]:
    """(iter_N folder, model section, tokenizer name, vocabulary size) of a checkpoint."""
    from pretrain.checkpoint import storage
    from pretrain.recipe import model_config_from_dict

    found = storage.resolve_load(str(path), path.parent)
    assert found is not None  # resolve_load gives None only for load None or auto
    extra = storage.read_extra(found)
    recipe = extra.get("recipe")
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise UserError(f"checkpoint '{found}' stores no recipe, so its architecture is unknown")
    model = model_config_from_dict(recipe["model"], f"in checkpoint {found}")
    vocab_size = extra.get("vocab_size") or model.vocab_size
    if vocab_size is None:
        raise UserError(f"checkpoint '{found}' does not record its vocabulary size")
    tokenizer = (recipe.get("data") or {}).get("tokenizer", "byte")
    return found, model, tokenizer, int(vocab_size)


def build_generator_model(model: Any, vocab_size: int, tensor: int, pipeline: int) -> tuple[Any, Any]:
    """This process's model chunk at tensor × pipeline = the world size (no sequence parallelism:
    megatron-core's static generation refuses it for dense layers), and the device."""
    import torch

    from model.config import check_model
    from model.gpt import ModelBuild, build_model_chunks
    from parallel.config import ParallelConfig
    from parallel.layout import Layout, init_model_parallel, init_process_group, pick_device, world_from_env
    from upstream import cpu

    rank, local_rank, world_size = world_from_env()
    if tensor * pipeline != world_size:
        raise UserError(f"--tensor {tensor} × --pipeline {pipeline} must equal the number of processes, {world_size}")
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    check_model(model, parallel)
    layout = Layout.from_config(parallel, world_size)
    device = pick_device("auto", local_rank)
    cpu.enable(device)
    init_process_group(device, rank, world_size)
    _, groups = init_model_parallel(layout)
    build = ModelBuild(layout=layout, perform_initialization=False, batch_p2p_comm=device.type == "cuda")
    (chunk,) = build_model_chunks(model, build, vocab_size, groups)
    return chunk.to(device).eval(), torch.device(device)


class TextStream:
    """Prints the text of the ids as they arrive; a character split over several ids waits for its
    last one (a trailing U+FFFD is held back until more ids come)."""

    def __init__(self, tokenizer: Any, out: Any = None):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.detokenize(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text[self.printed :])
            self.printed = len(text)

    def finish(self) -> None:
        self._write(self.tokenizer.detokenize(self.ids)[self.printed :] + "\n")

    def _write(self, text: str) -> None:
        if self.out is not None and text:
            self.out.write(text)
            self.out.flush()


def run(args: argparse.Namespace) -> int:
    from upstream.process import prepare_process

    check_args(args)
    prepare_process(quiet=not args.debug)
    from data.tokenizer import build_tokenizer
    from model.generation import Sampling, generate
    from pretrain.checkpoint import storage

    path, model, tokenizer_name, vocab_size = read_checkpoint(args.checkpoint)
    tokenizer = build_tokenizer(args.tokenizer or tokenizer_name)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"tokenizer '{args.tokenizer or tokenizer_name}' has {tokenizer.vocab_size} ids, the model in "
            f"'{path}' only {vocab_size}: give the tokenizer it was trained with (--tokenizer)"
        )
    prompt = tokenizer.tokenize(args.prompt) or [tokenizer.eod]  # an empty prompt starts a document
    if len(prompt) + args.max_new_tokens > model.seq_length:
        raise UserError(
            f"the prompt ({len(prompt)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
            f"model's seq_length {model.seq_length}"
        )
    chunk, _ = build_generator_model(model, vocab_size, args.tensor, args.pipeline)
    storage.load(path, [chunk], None)
    rank = int(os.environ.get("RANK", "0"))
    stream = TextStream(tokenizer, sys.stdout if rank == 0 else None)
    if rank == 0:
        sys.stdout.write(args.prompt)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    # Ids the tokenizer cannot decode are never drawn (a model padded past its tokenizer).
    generate(chunk, tokenizer, prompt, args.max_new_tokens, sampling, tokenizer.vocab_size, stream.add)
    stream.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_tool(lambda: run(args), args.debug)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from parallel.layout import shutdown

            shutdown()


if __name__ == "__main__":
    exit_quickly(main())
