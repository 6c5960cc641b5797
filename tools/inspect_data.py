"""What a training step reads: `python -m tools.inspect_data --recipe R [overrides] --step N`.

Prints the samples of global step N (1-based, as `step` in metrics.jsonl): for each, its global
sample index, the data-parallel rank and micro-batch that read it, the dataset it came from, the
documents it holds (ids in that dataset's .idx) and their decoded text. The samples are found the
way the trainer finds them: the same megatron-core datasets (their indices loaded from the run's
data cache, or built there as the trainer would on its first start) and `data.loader.BatchPlan`,
the one place that decides which samples a step, a data-parallel rank and a micro-batch read.
Step N reads samples [(N-1)·global_batch_size, N·global_batch_size): a run whose
global_batch_size changed on a resume read others. Bad input is one `error:` line, exit code 2.

An entry point, like pretrain_gpt.py: it reads the whole recipe and builds the data as the trainer
does (pretrain.recipe, pretrain.trainer.build_data, imported when it runs); nothing in data/
imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from typing import Any

from common.errors import UserError, run_tool


@dataclasses.dataclass(frozen=True)
class SampleView:
    """One sample of a step as the trainer reads it, with where its tokens come from."""

    index: int  # global sample index in the train split
    data_rank: int
    micro_batch: int
    dataset: str  # the indexed dataset's prefix
    dataset_sample: int  # megatron-core GPTDataset index (its own shuffled order)
    documents: list[int]  # document ids in the dataset's .idx, in sample order
    tokens: list[int]  # the seq_length + 1 tokens: inputs and, shifted by one, labels
    loss_tokens: int  # tokens whose prediction counts in the loss
    # data.reset_attention_mask: [start, end) of each document among the input tokens, the spans
    # the attention stays inside; None without it (attention spans the whole sample)
    spans: list[tuple[int, int]] | None = None
    positions_restart: bool = False  # data.reset_position_ids: RoPE positions restart at each document


def step_samples(
    samples: Any, global_batch_size: int, micro_batch_size: int, dp_size: int, step: int
) -> Iterator[SampleView]:
    """Every sample of 1-based `step`, data rank by data rank, micro-batch by micro-batch, as
    data.loader.BatchPlan hands them to the trainer."""
    from data.loader import BatchPlan
    from model.attention.documents import runs

    first = (step - 1) * global_batch_size
    plan = BatchPlan(global_batch_size, micro_batch_size, dp_size)
    for data_rank in range(dp_size):
        rank_plan = plan.for_rank(data_rank, 0, 1)
        for micro in range(plan.micro_batches):
            batch = rank_plan.whole_batch(samples, first, micro)  # [b, s], what the trainer reads
            for row, index in enumerate(rank_plan.indices(first, micro)):
                dataset, position, documents = samples.origin(index)
                tokens = batch["tokens"][row].tolist() + batch["labels"][row, -1:].tolist()
                ids = batch.get("document_ids")
                spans = runs(ids[row]) if ids is not None else None
                yield SampleView(
                    index=index,
                    data_rank=data_rank,
                    micro_batch=micro,
                    dataset=dataset,
                    dataset_sample=position,
                    documents=documents,
                    tokens=tokens,
                    loss_tokens=int(batch["loss_mask"][row].sum()),
                    spans=spans,
                    positions_restart=bool((batch["position_ids"][row, 1:] == 0).any()),
                )


def render(view: SampleView, tokenizer: Any) -> str:
    """A header line, then the text of each document piece (EOD ends a document)."""
    docs = ", ".join(str(d) for d in view.documents)
    lines = [
        f"--- sample {view.index} (data rank {view.data_rank}, micro-batch {view.micro_batch}): "
        f"{view.dataset} sample {view.dataset_sample}, documents {docs}; {view.loss_tokens} loss tokens"
    ]
    if view.spans is not None:
        spans = " ".join(f"[{a}, {b})" for a, b in view.spans)
        restart = "; positions restart at each" if view.positions_restart else ""
        lines.append(f"attention inside {len(view.spans)} documents (input tokens): {spans}{restart}")
    elif view.positions_restart:
        lines.append("positions restart after each EOD; attention spans the whole sample")
    piece: list[int] = []
    for token in view.tokens:
        if token == tokenizer.eod:
            lines.append(tokenizer.detokenize(piece) + "<EOD>")
            piece = []
        else:
            piece.append(token)
    if piece:
        lines.append(tokenizer.detokenize(piece))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.inspect_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipes/NAME(.yaml), a path, or a run's recipe.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as given to pretrain_gpt.py")
    parser.add_argument("--step", type=int, required=True, help="global step, 1-based (metrics.jsonl's step)")
    parser.add_argument("--micro-batch", type=int, help="only this micro-batch (0-based) of each data rank")
    parser.add_argument("--data-rank", type=int, help="only this data-parallel rank's samples")
    parser.add_argument("--world-size", type=int, default=1, help="the run's number of processes (default 1)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from planning.setup import validate_for_world
    from pretrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    layout, plan = validate_for_world(recipe, args.world_size)
    if args.step < 1:
        raise UserError(f"--step must be at least 1 (steps count from 1, as in metrics.jsonl), got {args.step}")
    if args.data_rank is not None and not 0 <= args.data_rank < layout.data:
        raise UserError(f"--data-rank {args.data_rank} is outside [0, {layout.data}): the data-parallel size")
    if args.micro_batch is not None and not 0 <= args.micro_batch < plan.micro_batches:
        raise UserError(
            f"--micro-batch {args.micro_batch} is outside [0, {plan.micro_batches}): micro-batches per step"
        )
    from upstream.process import prepare_process

    prepare_process(quiet=not args.debug)
    from data.tokenizer import build_tokenizer
    from pretrain.trainer import build_data

    tokenizer = build_tokenizer(recipe.data.tokenizer)
    samples = build_data(recipe, tokenizer)["train"]
    t = recipe.train
    first = (args.step - 1) * t.global_batch_size
    print(
        f"step {args.step}: train samples {first}-{first + t.global_batch_size - 1}; data-parallel size "
        f"{layout.data}, {plan.micro_batches} micro-batches of {t.micro_batch_size} per rank"
    )
    for view in step_samples(samples, t.global_batch_size, t.micro_batch_size, layout.data, args.step):
        if args.data_rank not in (None, view.data_rank) or args.micro_batch not in (None, view.micro_batch):
            continue
        print(render(view, tokenizer), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: run(args), args.debug)


if __name__ == "__main__":
    from upstream.process import exit_quickly

    exit_quickly(main())
