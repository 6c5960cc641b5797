"""The moments of megatron-core's 1F1B pipeline schedules (interleaved too) that the memory model
looks at: which model chunks' micro-batches hold activations, whose backward runs next, and how many
pipeline tensors `overlap_p2p_comm` holds beyond the blocking schedule."""

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


def overlap_held(pipeline: int, virtual: int, rank: int, micro_batches: int, overlapped: bool = True) -> list[int]:
    """Per moment of `in_flight` (same order), how many more [s·b/t, h] pipeline tensors megatron-core
    0.16's interleaved schedule holds with `overlap_p2p_comm` than without it
    (pipeline_parallel/schedules.py:forward_backward_pipelining_with_interleaving):

    - in the steady state each forward posts the receive of the next forward's input before the
      backward that follows it runs (`pp_post_forward`, `fwd_recv_buffer`); the blocking schedule
      receives it after that backward. One tensor, where the next forward receives (not chunk 0 of
      the first stage) and is not past the last;
    - the warm-up's last receive stays bound to the schedule's `input_tensor` variable for the rest
      of the step (the overlapped steady state never rebinds it, the blocking one does each step):
      once that micro-batch's backward has run, its input and the gradient left on it (`.grad`,
      which `backward_step` reads) are two tensors nothing else holds.

    The sends (`send_next_wait_handle`, `send_prev_wait_handle`) hold what the blocking schedule's
    variables hold too at a backward: no difference there. All 0 when not `overlapped`."""
    if pipeline == 1 or virtual == 1 or not overlapped:
        return [0] * len(in_flight(pipeline, virtual, rank, micro_batches))
    table = _schedule_table(micro_batches, virtual, pipeline)
    total = len(table)
    warmup = min((pipeline - rank - 1) * 2 + (virtual - 1) * pipeline, total)

    def receives(forward: int) -> bool:  # megatron-core's recv_tensor_from_previous_stage
        return forward < total and not (rank == 0 and table[forward][1] == 0)

    # the backward (index in backward order) of the micro-batch received at the end of the warm-up
    leaked = None
    if warmup < total and receives(warmup):
        mb, chunk = table[warmup]
        leaked = table.index((mb, virtual - 1 - chunk))
    held = []
    for i in range(total):  # moment i: after forward i (and before the backward paired with it)
        backward = i - warmup
        if backward < 0:
            held.append(0)
            continue
        ahead = 1 if receives(i + 1) else 0
        held.append(ahead + (2 if leaked is not None and backward > leaked else 0))
    for backward in range(max(total - warmup, 0), total):  # cool-down: blocking
        held.append(2 if leaked is not None and backward > leaked else 0)
    return held
