"""The moments of megatron-core's 1F1B pipeline schedules (interleaved too) that the memory model
looks at: which model chunks' micro-batches hold activations, and whose backward runs next."""

from __future__ import annotations


def in_flight(pipeline: int, virtual: int, rank: int, micro_batches: int) -> list[tuple[list[int], int | None]]:
    """The moments of megatron-core's 1F1B (interleaved when virtual > 1) schedule on pipeline rank
    `rank`: after each forward, the model chunks of the micro-batches whose activations are held, and
    the chunk whose backward runs next (None in the warm-up)."""
    if pipeline == 1:
        return [([0], 0)]
    if virtual == 1:
        return [([0] * min(pipeline - rank, micro_batches), 0)]
    table = _schedule_table(micro_batches, virtual, pipeline)
    warmup = min((pipeline - rank - 1) * 2 + (virtual - 1) * pipeline, len(table))
    live: list[int] = []
    moments: list[tuple[list[int], int | None]] = []
    for i, (_, chunk) in enumerate(table):
        live.append(chunk)
        backward = virtual - 1 - table[i - warmup][1] if i >= warmup else None
        moments.append((list(live), backward))
        if backward is not None:  # steady state: each forward is followed by the backward of the oldest
            live.remove(backward)
    # cool-down: the remaining backwards, oldest first
    for j in range(max(len(table) - warmup, 0), len(table)):
        backward = virtual - 1 - table[j][1]
        moments.append((list(live), backward))
        live.remove(backward)
    return moments


def _schedule_table(micro_batches: int, chunks: int, group: int) -> list[tuple[int, int]]:
    """megatron-core's forward order (pipeline_parallel/schedules.py:get_schedule_table): groups of
    `group` micro-batches run through chunk 0, then chunk 1, ..."""
    table = []
    for start in range(0, micro_batches, group):
        end = micro_batches if start + group >= micro_batches else start + group
        table += [(mb, c) for c in range(chunks) for mb in range(start, end)]
    return table
