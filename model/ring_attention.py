"""Ring attention for context parallelism: block kernels with log-sum-exp, the K/V ring, and a core_attention.

Layout (megatron's load-balanced causal layout): the sequence is cut into 2·cp equal chunks and CP
rank r holds chunks r and 2·cp−1−r, in that order. Each rank keeps its queries; K/V blocks travel
around the ring and every rank merges the partial attention of each block with the online-softmax
rule. Scores exist only for one block at a time ([s/cp, s/cp]), never for the whole sequence.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType

from model.layers import SDPAttention

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------ block kernels


class BlockKernels(NamedTuple):
    """One attention backend: forward returns (out, lse), backward takes the final out and lse.

    `gqa`: k/v may have fewer heads than q (each K/V head serving consecutive query heads), and the
    backward returns dk/dv per K/V head. Otherwise the ring hands it equal head counts.
    """

    forward: Callable[[Tensor, Tensor, Tensor, bool, float], Tuple[Tensor, Tensor]]
    backward: Callable[..., Tuple[Tensor, Tensor, Tensor]]
    gqa: bool = False


def _causal_mask(sq: int, sk: int, device) -> Tensor:
    """True where a key is in the future of its query (masked); the standard lower triangle is kept."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    # [b, h, sq, d] x [b, h, sk, d] -> scores [b, h, sq, sk], one block only
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(_causal_mask(q.size(2), k.size(2), q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    qf, kf, vf, doutf = q.float(), k.float(), v.float(), dout.float()
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(_causal_mask(q.size(2), k.size(2), q.device), float("-inf"))
    probs = torch.exp(scores - lse.float().unsqueeze(-1))  # [b, h, sq, sk], normalized by the FINAL lse
    d_probs = torch.matmul(doutf, vf.transpose(-2, -1))
    delta = (doutf * out.float()).sum(-1, keepdim=True)  # [b, h, sq, 1]: rowsum(dO ∘ O) of the final out
    d_scores = probs * (d_probs - delta) * scale
    dq = torch.matmul(d_scores, kf)
    dk = torch.matmul(d_scores.transpose(-2, -1), qf)
    dv = torch.matmul(probs.transpose(-2, -1), doutf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _aten_cpu_forward(q, k, v, causal: bool, scale: float):
    # Private aten op (torch 2.13 schema: q, k, v, dropout_p, is_causal, *, attn_mask, scale).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _aten_cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


# CUDA kernels. None of them runs in CI (no GPU there): each is used only after `_verify` has
# compared it with plain math on this device, dtype and head size (see _backend_for).


def _cuda_flash_forward(q, k, v, causal: bool, scale: float):
    # torch's flash kernel (fp16/bf16, sm80+): lse [b, h, sq] fp32
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _cuda_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    # cum_seq None = not variable-length; the rng tensors are read only under dropout
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.size(2), k.size(2), 0.0, causal, no_rng, no_rng,
        scale=scale)


_EFFICIENT_LSE_ALIGN = 32  # torch's memory-efficient kernel pads its lse rows to a multiple of this


def _cuda_efficient_forward(q, k, v, causal: bool, scale: float):
    # torch's memory-efficient kernel (also fp32): its lse [b, h, sq padded] is trimmed to sq
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, lse[..., :q.size(2)]


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    rows = q.size(2)
    padded = -(-rows // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    lse = torch.nn.functional.pad(lse.float(), (0, padded - rows)).contiguous()
    no_rng = torch.empty((), dtype=torch.int64)
    # the kernel reads out and dout with [b, s, h, d] row strides (what its forward returns)
    dout, out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (dout, out))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def _flash_attn_forward(q, k, v, causal: bool, scale: float):
    # flash-attn >= 2.6 works in [b, s, h, d] and returns softmax_lse [b, h, sq] fp32
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.0,
                                  softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    dout_, q_, k_, v_, out_ = (t.transpose(1, 2).contiguous() for t in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    _flash_attn_backward(dout_, q_, k_, v_, out_, lse.contiguous(), dq, dk, dv, dropout_p=0.0,
                         softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
                         softcap=0.0, alibi_slopes=None, deterministic=False)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _flash_attn_installed() -> bool:
    try:
        from flash_attn.flash_attn_interface import _flash_attn_backward
    except ImportError:
        return False
    return "window_size_left" in inspect.signature(_flash_attn_backward).parameters


_HALF = (torch.float16, torch.bfloat16)

BACKENDS = {
    "math": BlockKernels(_math_forward, _math_backward),
    "aten_cpu": BlockKernels(_aten_cpu_forward, _aten_cpu_backward, gqa=True),
    "flash_attn": BlockKernels(_flash_attn_forward, _flash_attn_backward, gqa=True),
    "cuda_flash": BlockKernels(_cuda_flash_forward, _cuda_flash_backward),
    "cuda_efficient": BlockKernels(_cuda_efficient_forward, _cuda_efficient_backward),
}

# Fastest first, per device type: (backend, applies to this dtype?). Plain math is the last resort.
CANDIDATES = {
    "cuda": (("flash_attn", lambda dtype: dtype in _HALF and _flash_attn_installed()),
             ("cuda_flash", lambda dtype: dtype in _HALF),
             ("cuda_efficient", lambda dtype: True)),
    "cpu": (("aten_cpu", lambda dtype: True),),
}

# Largest relative error (Frobenius norm) a backend may show against fp32 math on the probe. A
# kernel that is wired wrongly (lse base or padding, layout, scale, causal alignment) is off by O(1).
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _verify(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when backend `name` gives math's out, lse, dq, dk, dv on a small problem, else what differs.

    The problem has the ring's block shapes and layout: a causal diagonal block and an unmasked
    block with twice as many query rows as keys, each query row given the lse of its own block; for
    a kernel that claims `gqa`, both again with 4 query heads on 2 K/V heads.
    """
    kernels, tolerance = BACKENDS[name], _PROBE_TOLERANCE.get(dtype, 4e-2)
    generator = torch.Generator().manual_seed(0)

    def draw(heads: int, rows: int) -> Tensor:
        # as the ring passes them: a model's [s, b, h, d] seen as [b, h, s, d] (b = 2, so the batch
        # stride is not the sequence's), a slice at an offset
        full = torch.randn(2 * rows, 2, heads, head_dim, generator=generator).to(device, dtype)
        return full[rows:].permute(1, 2, 0, 3)

    cases = [(2, 2, True, 64, 64), (2, 2, False, 128, 64)]
    if kernels.gqa:
        cases += [(4, 2, True, 64, 64), (4, 2, False, 128, 64)]
    scale = head_dim ** -0.5
    for heads, groups, causal, rows, keys in cases:
        q, k, v, dout = draw(heads, rows), draw(groups, keys), draw(groups, keys), draw(heads, rows)
        want = _math_reference(q, k, v, dout, causal, scale)
        try:
            out, lse = kernels.forward(q, k, v, causal, scale)
            got = (out, lse) + tuple(kernels.backward(dout, q, k, v, out, lse, causal, scale))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
            return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            if a.shape != b.shape:
                return f"{label} has shape {tuple(a.shape)}, math {tuple(b.shape)}"
            error = ((a.double() - b).norm() / b.norm()).item()
            if not error <= tolerance:  # also catches NaN
                where = f" with {heads} query heads on {groups} K/V heads" if heads != groups else ""
                return f"{label} differs from math by {error:.2g}{where} (relative; allowed {tolerance:g})"
    return None


def _math_reference(q, k, v, dout, causal: bool, scale: float) -> Tuple[Tensor, ...]:
    """out, lse, dq, dk, dv in fp32 plain math (float64 tensors), K/V heads shared by query heads."""
    rep = q.size(1) // k.size(1)
    q, dout = q.double(), dout.double()
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    out, lse = _math_forward(q, k, v, causal, scale)
    dq, dk, dv = _math_backward(dout, q, k, v, out, lse, causal, scale)
    return out, lse, dq, _reduce_heads(dk, rep).double(), _reduce_heads(dv, rep).double()


@functools.lru_cache(maxsize=None)
def _backend_for(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """Chosen once per (device type, dtype, head size): the first candidate that runs and agrees with
    plain math on a probe (_verify), else plain math. A candidate that fails is named in a warning."""
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device(
        device_type)
    for name, applies in CANDIDATES.get(device_type, ()):
        if not applies(dtype):
            continue
        problem = _verify(name, device, dtype, head_dim)
        if problem is None:
            return name
        warnings.warn(f"ring attention: not using the {name} kernels for {dtype}, head size {head_dim} on "
                      f"{device_type}: {problem}; trying the next")
    return "math"


def select_backend(t: Tensor) -> str:
    """Name of the BACKENDS entry that block_forward/block_backward use for q tensors like `t` [b, h, s, d]."""
    return _backend_for(t.device.type, t.dtype, t.size(-1))


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    """Attention of one block: q [b, h, sq, d], k/v [b, h, sk, d] -> out [b, h, sq, d], lse [b, h, sq]
    in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    out, lse = BACKENDS[select_backend(q)].forward(q, k, v, causal, scale)
    return out, lse.to(_accumulation_dtype(q))


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the FINAL (merged) out and lse of its query rows: (dq, dk, dv)."""
    return BACKENDS[select_backend(q)].backward(dout, q, k, v, out, lse, causal, scale)


# ---------------------------------------------------------------------------------------- the ring

_K_TAG, _V_TAG, _DK_TAG, _DV_TAG = 0, 1, 2, 3  # distinct tags: gloo matches messages by (peer, tag)


class _Ring(NamedTuple):
    group: dist.ProcessGroup
    rank: int  # rank inside the CP group
    size: int
    next: int  # global rank of (rank + 1) mod size
    prev: int  # global rank of (rank - 1) mod size

    @classmethod
    def of(cls, group) -> "_Ring":
        ranks = dist.get_process_group_ranks(group)
        rank, size = dist.get_rank(group), len(ranks)
        return cls(group, rank, size, ranks[(rank + 1) % size], ranks[(rank - 1) % size])

    def shift(self, tensors: Tuple[Tensor, ...], tags: Tuple[int, ...]) -> "_Transfer":
        """Posts send(each dense tensor → next) and recv(← prev), one message per tensor and tag."""
        incoming = tuple(torch.empty_like(t) for t in tensors)  # same strides as t (dense)
        sends = [lambda t=t, tag=tag: dist.isend(_message(t), self.next, group=self.group, tag=tag)
                 for t, tag in zip(tensors, tags)]
        recvs = [lambda t=t, tag=tag: dist.irecv(_message(t), self.prev, group=self.group, tag=tag)
                 for t, tag in zip(incoming, tags)]
        # Even ranks send first, odd ranks receive first: cannot deadlock even where p2p blocks.
        works = [post() for post in (sends + recvs if self.rank % 2 == 0 else recvs + sends)]
        return _Transfer(works, incoming, tensors)


class _Transfer(NamedTuple):
    works: List
    incoming: Tuple[Tensor, ...]  # what the recvs fill, laid out like the tensors sent
    # The tensors sent stay referenced until _arrive, as a send may read them until then; so every
    # backend holds the same memory, also the no-op one the benchmark simulates a ring with.
    sent: Tuple[Tensor, ...]


def _dense(t: Tensor) -> Tensor:
    """t itself when its elements fill one block of memory in some order of its dims (a model's
    [s, b, h, d] heads seen as [b, h, s, d]), else a copy that does, in the same order of dims (a
    value split out of the fused QKV projection). The ring keeps that layout: its messages,
    accumulators and output are allocated like the input, and the kernels take the views as they
    are (so a model's [s, b, ...] tensors are never copied into [b, h, s, d])."""
    order = _stride_order(t)
    if t.permute(order).is_contiguous():
        return t
    return t.permute(order).contiguous().permute([order.index(dim) for dim in range(t.dim())])


def _stride_order(t: Tensor) -> List[int]:
    return sorted(range(t.dim()), key=t.stride, reverse=True)


def _message(t: Tensor) -> Tensor:
    # a dense t's elements as one contiguous tensor, what isend/irecv need
    return t.permute(_stride_order(t))


def _arrive(pending: _Transfer) -> Tuple[Tensor, ...]:
    for work in pending.works:
        work.wait()
    return pending.incoming


def _step_blocks(step: int, rank: int, size: int, half: int) -> Tuple[Tuple[slice, slice, bool], ...]:
    """The (query rows, key rows, causal) pieces computed at ring `step`, against the K/V of CP rank
    (rank − step) mod size: the causal diagonal at step 0 (its results start the accumulators),
    after that the two quarter-blocks [one chunk of ours × one chunk of its] not fully masked, one
    kernel call each, so that no piece's gradients exceed half our rows or half its keys.

    Fully masked quarter-blocks are never computed: an earlier rank's second chunk is in the
    future of all our queries; a later rank's both chunks are in the future of our first chunk.
    """
    source = (rank - step) % size
    if step == 0:
        return ((slice(None), slice(None), True),)
    first, second = slice(0, half), slice(half, None)
    if source < rank:  # both our chunks see its first chunk
        return (first, first, False), (second, first, False)
    return (second, first, False), (second, second, False)  # our second chunk sees both of its


def _reduce_heads(grad: Tensor, rep: int) -> Tensor:
    # [b, np, keys, hn] -> [b, ng, keys, hn] in the accumulation dtype: a shared K/V head gets the
    # sum over its query heads
    b, heads, keys, hn = grad.shape
    return grad.to(_accumulation_dtype(grad)).view(b, heads // rep, rep, keys, hn).sum(2)


def _fold(x: Tensor, rep: int) -> Tensor:
    # [b, np, rows, ...] -> [b, ng, rep·rows, ...]: the query heads sharing one K/V head become
    # more rows of that head (exact without a causal mask, where rows are independent)
    b, heads, rows = x.shape[:3]
    return x.reshape(b, heads // rep, rep * rows, *x.shape[3:])


def _unfold(x: Tensor, rep: int) -> Tensor:
    # [b, ng, rep·rows, ...] -> [b, np, rows, ...]
    b, groups, folded = x.shape[:3]
    return x.reshape(b, groups * rep, folded // rep, *x.shape[3:])


def _heads_plan(q: Tensor, k: Tensor, causal: bool) -> str:
    """How a block meets grouped-query attention (rep query heads per K/V head):

    - 'native': equal head counts, or a kernel that takes fewer K/V heads (`BlockKernels.gqa`);
    - 'fold' (other kernels, unmasked blocks): the rep query heads become rep times the rows of
      their K/V head; exact because no mask ties a row to its position;
    - 'expand' (other kernels, the causal block): K/V copied per query head.

    With the CPU kernel 'native' beat folding on unmasked blocks too: at 8K tokens, 32/8 heads,
    fp32, the peak RSS per rank went from 733 to 701 MiB at CP 2 and from 405 to 389 MiB at CP 4.
    """
    if q.size(1) == k.size(1) or BACKENDS[select_backend(q)].gqa:
        return "native"
    return "expand" if causal else "fold"


def _block_kv(kv: Tuple[Tensor, Tensor], cols: slice, rep: int, expand: bool) -> Tuple[Tensor, Tensor]:
    # k, v [b, ng, s/cp, hn] -> [b, ng, keys, hn] (or [b, np, keys, hn], copied per query head)
    k, v = kv[0][:, :, cols], kv[1][:, :, cols]
    if expand:
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return k, v


def _attend_block(q: Tensor, kv: Tuple[Tensor, Tensor], rows: slice, cols: slice, causal: bool, scale: float):
    """(out, lse) of query rows `rows` against key rows `cols` of kv = (k, v), per query head."""
    rep, plan = q.size(1) // kv[0].size(1), _heads_plan(q, kv[0], causal)
    k, v = _block_kv(kv, cols, rep, expand=plan == "expand")
    if plan != "fold":
        return block_forward(q[:, :, rows], k, v, causal, scale)
    out, lse = block_forward(_fold(q[:, :, rows], rep), k, v, False, scale)
    return _unfold(out, rep), _unfold(lse, rep)


def _grad_block(dout, q, kv, out, lse, rows: slice, cols: slice, causal: bool, scale: float):
    """(dq [b, np, rows, hn], dk and dv [b, ng, keys, hn]) of one block, given the final out and lse."""
    rep, plan = q.size(1) // kv[0].size(1), _heads_plan(q, kv[0], causal)
    k, v = _block_kv(kv, cols, rep, expand=plan == "expand")
    if plan == "fold":
        fold = lambda t: _fold(t[:, :, rows], rep)  # noqa: E731
        dq, dk, dv = block_backward(fold(dout), fold(q), k, v, fold(out), fold(lse), False, scale)
        return _unfold(dq, rep), dk, dv
    dq, dk, dv = block_backward(dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows],
                                causal, scale)
    if plan == "expand":
        dk, dv = _reduce_heads(dk, rep), _reduce_heads(dv, rep)
    return dq, dk, dv


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Online softmax in the accumulation dtype, in place: out/lse ([b, np, rows, hn] / [b, np, rows])
    absorb one block (whose out, a fresh kernel result, is scaled in place: no block-sized temporary)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.to(out.dtype).mul_(torch.exp(block_lse - new_lse).unsqueeze(-1)))
    lse.copy_(new_lse)


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    # merges and gradient sums run in fp32; fp64 inputs keep fp64 (the CPU kernel wants lse in it)
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _accumulator_like(t: Tensor, like: Tensor) -> Tensor:
    """t in the accumulation dtype with like's layout (t itself when it already is; a size-1 dim's
    stride is moot)."""
    dtype = _accumulation_dtype(like)
    if t.dtype == dtype and all(a == b or n == 1 for a, b, n in zip(t.stride(), like.stride(), t.shape)):
        return t
    return torch.empty_like(like, dtype=dtype).copy_(t)


def _ring_forward(q: Tensor, kv: Tuple[Tensor, Tensor], ring: _Ring, scale: float) -> Tuple[Tensor, Tensor]:
    """q [b, np, s/cp, hn], kv = (k, v) [b, ng, s/cp, hn] -> out [b, np, s/cp, hn], lse [b, np, s/cp],
    both in the accumulation dtype."""
    half = q.size(2) // 2
    out = lse = None
    for step in range(ring.size):
        # send next: the block we hold moves on while we compute with it
        pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        # compute current, merge (step 0 is the causal diagonal: every query row sees at least itself)
        for rows, cols, causal in _step_blocks(step, ring.rank, ring.size, half):
            block_out, block_lse = _attend_block(q, kv, rows, cols, causal, scale)
            if out is None:
                out, lse = _accumulator_like(block_out, q), block_lse
            else:
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            del block_out, block_lse  # freed before the next kernel allocates its own
        if pending is not None:
            kv = _arrive(pending)
    return out, lse


def _ring_backward(dout, q, kv: Tuple[Tensor, Tensor], out, lse, ring: _Ring,
                   scale: float) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """-> dq [b, np, s/cp, hn], (dk, dv) [b, ng, s/cp, hn] for this rank's own K/V, in the
    accumulation dtype.

    A block's dK/dV accumulator follows its K/V one step behind: rank r adds its share of block j
    and passes it on; after cp hops it is back at rank j, complete.
    """
    half = q.size(2) // 2
    dq = dkv_pending = None
    for step in range(ring.size):
        # send next: K/V for the following step
        kv_pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        # compute current: this block's share of dq (local) and of dk/dv (travelling)
        dk = dv = None
        for rows, cols, causal in _step_blocks(step, ring.rank, ring.size, half):
            dq_block, dk_block, dv_block = _grad_block(dout, q, kv, out, lse, rows, cols, causal, scale)
            if dq is None:  # step 0, the causal diagonal: every query row, our own block's keys
                dq = _accumulator_like(dq_block, q)
                dk, dv = _accumulator_like(dk_block, kv[0]), _accumulator_like(dv_block, kv[1])
            else:
                if dk is None:  # the accumulators that previous ranks built for this block
                    dk, dv = _arrive(dkv_pending)
                dq[:, :, rows] += dq_block
                dk[:, :, cols] += dk_block
                dv[:, :, cols] += dv_block
            del dq_block, dk_block, dv_block  # freed before the next kernel allocates its own
        # pass the accumulators on
        if ring.size > 1:
            dkv_pending = ring.shift((dk, dv), (_DK_TAG, _DV_TAG))
        if kv_pending is not None:
            kv = _arrive(kv_pending)
    return dq, (_arrive(dkv_pending) if dkv_pending is not None else (dk, dv))


def _check_heads(heads: int, groups: int) -> None:
    if groups <= 0 or heads % groups != 0:
        raise ValueError(f"ring attention needs num_attention_heads ({heads}) divisible by num_query_groups ({groups})")


class RingAttentionFunction(torch.autograd.Function):
    """Causal attention over a context-parallel group, on megatron's load-balanced layout.

    q [b, np, s/cp, hn], k/v [b, ng, s/cp, hn] (np a multiple of ng) -> out [b, np, s/cp, hn].
    Forward communication: each rank's K and V (ng heads, two messages) travel once around
    `group` (cp−1 isend/irecv hops, each overlapped with one block of compute).
    Backward communication: the K/V travel around again (cp−1 hops) and their dK/dV accumulators
    (fp32; fp64 for fp64 inputs) follow one step behind (cp hops), ending at the rank that owns
    the K/V.
    Dense inputs in any dim order (a model's [s, b, h, d] seen as [b, h, s, d]) are used as they
    are, and the output and gradients come back in the same layout.
    cp == 1 communicates nothing.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group, scale: float) -> Tensor:
        _check_heads(q.size(1), k.size(1))
        if q.size(2) % 2:
            raise ValueError(f"ring attention needs an even local sequence (two chunks), got {q.size(2)}")
        ring = _Ring.of(group)
        out, lse = _ring_forward(_dense(q), (_dense(k), _dense(v)), ring, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, (dk, dv) = _ring_backward(_dense(dout), _dense(q), (_dense(k), _dense(v)), out, lse, ctx.ring,
                                      ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# ------------------------------------------------------------------------------- core attention


class RingAttention(SDPAttention):
    """Causal core attention over the context-parallel group (megatron-core's local
    DotProductAttention refuses context parallelism; TE's needs a GPU).

    Takes query [s/cp, b, np, hn] and key/value [s/cp, b, ng, hn] in the load-balanced layout and
    returns [s/cp, b, np·hn]. No dropout, mask tensor, bias or packed sequences.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        _check_heads(config.num_attention_heads, config.num_query_groups or config.num_attention_heads)
        # The parent asserts context_parallel_size == 1 (only TE may do CP); it reads nothing
        # else from it, so it is built from a shallow copy and then given the real config.
        parent_config = copy.copy(config)
        parent_config.context_parallel_size = 1
        super().__init__(parent_config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        cp_group = getattr(pg_collection, "cp", None)  # megatron's Attention passes tp and cp
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        self._check_call(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if self.training and self.attention_dropout.p > 0.0:
            raise NotImplementedError(
                f"RingAttention has no attention dropout, got {self.attention_dropout.p}; set attention_dropout to 0")
        # [s/cp, b, np, hn] -> [b, np, s/cp, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = RingAttentionFunction.apply(q, k, v, self.cp_group, self.softmax_scale)
        return self._to_hidden(context)  # [s/cp, b, np * hn]
