"""On gloo, an overlapped pipeline send keeps its tensor's memory until it is waited on.

megatron-core frees each pipeline output once it is sent (`deallocate_pipeline_outputs`, which
model/gpt.py turns on): `deallocate_output_tensor` swaps the tensor's storage for one element
(pipeline_parallel/schedules.py:154-165). With `overlap_p2p_comm` the interleaved schedule does so
while the send is still in flight (schedules.py:1522, 1600: it waits on the previous send only).
On NCCL that is safe: the caching allocator does not reuse the block before the NCCL stream is
done with it. Gloo's send request holds the same tensor, whose storage is now gone, and writes
from its old address later: the next stage receives whatever reused that memory, or the sending
rank aborts ("writev ... Bad address"). Here each send request of `_p2p_ops`
(p2p_communication.py:54-137) holds an alias of the sent storage until its `wait()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from upstream.patch import Patch


class SendHoldingItsTensor:
    """A send request that keeps the sent storage alive (a detached alias: megatron-core's swap of
    the original's storage does not reach it) until it is waited on."""

    def __init__(self, request: Any, tensor: torch.Tensor):
        self.request = request
        self.held: torch.Tensor | None = tensor.detach()

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        done = self.request.wait(*args, **kwargs)
        self.held = None
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self.request, name)


def _sends_hold_their_tensors(original: Callable) -> Callable:
    def p2p_ops(*, tensor_send_prev: Any, tensor_send_next: Any, **kwargs: Any) -> dict:
        reqs = original(tensor_send_prev=tensor_send_prev, tensor_send_next=tensor_send_next, **kwargs)
        for key, tensor in (("send_next", tensor_send_next), ("send_prev", tensor_send_prev)):
            if key in reqs:
                reqs[key] = SendHoldingItsTensor(reqs[key], tensor)
        return reqs

    return p2p_ops


def patch() -> Patch:
    from megatron.core.pipeline_parallel import p2p_communication

    return Patch(
        "p2p.send_holds_its_tensor",
        "pipeline_parallel/p2p_communication.py:54 _p2p_ops; schedules.py:1522,1600 deallocate_output_tensor",
        p2p_communication,
        "_p2p_ops",
        wrap=_sends_hold_their_tensors,
    )
