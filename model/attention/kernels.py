"""Attention of one block, with its log-sum-exp: the kernels ring attention builds on, each checked
against plain math on this device, dtype and head size before it is used.

q/k/v are [b, heads, s, d] (v's d may be narrower: multi-latent attention); a kernel returns out
[b, h, sq, d_v] and lse [b, h, sq], and its backward takes the FINAL (merged over the ring) out and
lse of its query rows. Plain math is always there; the CPU's flash kernel, torch's CUDA flash and
memory-efficient kernels and flash-attn are used when they take the head sizes and their probe
agrees with it (`select_backend`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

Tensor = torch.Tensor


class BlockKernels(NamedTuple):
    """One attention backend: forward returns (out, lse), backward takes the final out and lse.

    `gqa`: k/v may have fewer heads than q (each K/V head serving consecutive query heads), and the
    backward returns dk/dv per K/V head. Otherwise the ring hands it equal head counts.
    `one_width`: q, k and v must have one head size; the kernel is not tried for multi-latent
    attention's values, narrower than its queries and keys.
    """

    forward: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    gqa: bool = False
    one_width: bool = False


def _causal_mask(sq: int, sk: int, device: torch.device) -> Tensor:
    """True where a key is in the future of its query (masked); the standard lower triangle is kept."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # [b, h, sq, d] x [b, h, sk, d] -> scores [b, h, sq, sk], one block only
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(_causal_mask(q.size(2), k.size(2), q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _math_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
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


def _aten_cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # Private aten op (torch 2.13 schema: q, k, v, dropout_p, is_causal, *, attn_mask, scale).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _aten_cpu_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


# CUDA kernels. None of them runs in CI (no GPU there): each is used only after `_verify` has
# compared it with plain math on this device, dtype and head size (see _backend_for).


def _cuda_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # torch's flash kernel (fp16/bf16, sm80+): lse [b, h, sq] fp32
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _cuda_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    # cum_seq None = not variable-length; the rng tensors are read only under dropout
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.size(2), k.size(2), 0.0, causal, no_rng, no_rng, scale=scale
    )


_EFFICIENT_LSE_ALIGN = 32  # torch's memory-efficient kernel pads its lse rows to a multiple of this


def _cuda_efficient_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # torch's memory-efficient kernel (also fp32): its lse [b, h, sq padded] is trimmed to sq
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.size(2)]


def _cuda_efficient_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    rows = q.size(2)
    padded = -(-rows // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    lse = torch.nn.functional.pad(lse.float(), (0, padded - rows)).contiguous()
    no_rng = torch.empty((), dtype=torch.int64)
    # the kernel reads out and dout with [b, s, h, d] row strides (what its forward returns)
    dout, out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (dout, out))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale
    )
    return dq, dk, dv


def _flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    # flash-attn >= 2.6 works in [b, s, h, d] and returns softmax_lse [b, h, sq] fp32
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        *(t.transpose(1, 2) for t in (q, k, v)),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    return out.transpose(1, 2), lse


def _flash_attn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.flash_attn_interface import _flash_attn_backward

    dout_, q_, k_, v_, out_ = (t.transpose(1, 2).contiguous() for t in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    _flash_attn_backward(
        dout_,
        q_,
        k_,
        v_,
        out_,
        lse.contiguous(),
        dq,
        dk,
        dv,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        window_size_left=-1,
        window_size_right=-1,
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
    )
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
    # torch's CPU and CUDA flash kernels raise on unequal head sizes; flash-attn 2 takes one head size
    "aten_cpu": BlockKernels(_aten_cpu_forward, _aten_cpu_backward, gqa=True, one_width=True),
    "flash_attn": BlockKernels(_flash_attn_forward, _flash_attn_backward, gqa=True, one_width=True),
    "cuda_flash": BlockKernels(_cuda_flash_forward, _cuda_flash_backward, one_width=True),
    "cuda_efficient": BlockKernels(_cuda_efficient_forward, _cuda_efficient_backward),
}

# Fastest first, per device type: (backend, applies to this dtype?). Plain math is the last resort.
CANDIDATES = {
    "cuda": (
        ("flash_attn", lambda dtype: dtype in _HALF and _flash_attn_installed()),
        ("cuda_flash", lambda dtype: dtype in _HALF),
        ("cuda_efficient", lambda dtype: True),
    ),
    "cpu": (("aten_cpu", lambda dtype: True),),
}

# Largest relative error (Frobenius norm) a backend may show against fp32 math on the probe. A
# kernel that is wired wrongly (lse base or padding, layout, scale, causal alignment) is off by O(1).
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _verify(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int | None = None
) -> str | None:
    """None when backend `name` gives math's out, lse, dq, dk, dv on a small problem, else what differs.
    `v_head_dim`: the values' head size (None = head_dim).

    The problem has the ring's block shapes and layout: a causal diagonal block and an unmasked
    block with twice as many query rows as keys, each query row given the lse of its own block; for
    a kernel that claims `gqa`, both again with 4 query heads on 2 K/V heads.
    """
    kernels, tolerance = BACKENDS[name], _PROBE_TOLERANCE.get(dtype, 4e-2)
    generator = torch.Generator().manual_seed(0)

    def draw(heads: int, rows: int, width: int = head_dim) -> Tensor:
        # as the ring passes them: a model's [s, b, h, d] seen as [b, h, s, d] (b = 2, so the batch
        # stride is not the sequence's), a slice at an offset
        full = torch.randn(2 * rows, 2, heads, width, generator=generator).to(device, dtype)
        return full[rows:].permute(1, 2, 0, 3)

    v_width = v_head_dim or head_dim

    cases = [(2, 2, True, 64, 64), (2, 2, False, 128, 64)]
    if kernels.gqa:
        cases += [(4, 2, True, 64, 64), (4, 2, False, 128, 64)]
    scale = head_dim**-0.5
    for heads, groups, causal, rows, keys in cases:
        q, k = draw(heads, rows), draw(groups, keys)
        v, dout = draw(groups, keys, v_width), draw(heads, rows, v_width)
        want = _math_reference(q, k, v, dout, causal, scale)
        try:
            out, lse = kernels.forward(q, k, v, causal, scale)
            got = (out, lse) + tuple(kernels.backward(dout, q, k, v, out, lse, causal, scale))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as failure:
            return f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            if a.shape != b.shape:
                return f"{label} has shape {tuple(a.shape)}, math {tuple(b.shape)}"
            error = ((a.double() - b).norm() / b.norm()).item()
            if not error <= tolerance:  # also catches NaN
                where = f" with {heads} query heads on {groups} K/V heads" if heads != groups else ""
                return f"{label} differs from math by {error:.2g}{where} (relative; allowed {tolerance:g})"
    return None


def _math_reference(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool, scale: float) -> tuple[Tensor, ...]:
    """out, lse, dq, dk, dv in fp32 plain math (float64 tensors), K/V heads shared by query heads."""
    rep = q.size(1) // k.size(1)
    q, dout = q.double(), dout.double()
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    out, lse = _math_forward(q, k, v, causal, scale)
    dq, dk, dv = _math_backward(dout, q, k, v, out, lse, causal, scale)
    return out, lse, dq, reduce_heads(dk, rep).double(), reduce_heads(dv, rep).double()


@functools.cache
def _backend_for(device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int | None = None) -> str:
    """Chosen once per (device type, dtype, head sizes): the first candidate that takes these head
    sizes, runs and agrees with plain math on a probe (_verify), else plain math. A candidate that
    fails is named in a warning. `v_head_dim`: the values' head size (None = head_dim)."""
    device = (
        torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    )
    for name, applies in CANDIDATES.get(device_type, ()):
        if not applies(dtype) or (BACKENDS[name].one_width and v_head_dim not in (None, head_dim)):
            continue
        problem = _verify(name, device, dtype, head_dim, v_head_dim)
        if problem is None:
            return name
        warnings.warn(
            f"ring attention: not using the {name} kernels for {dtype}, head size {_sizes(head_dim, v_head_dim)} on "
            f"{device_type}: {problem}; trying the next",
            stacklevel=2,
        )
    return "math"


def _sizes(head_dim: int, v_head_dim: int | None) -> str:
    return str(head_dim) if v_head_dim in (None, head_dim) else f"{head_dim} (values {v_head_dim})"


def select_backend(t: Tensor, v_head_dim: int | None = None) -> str:
    """Name of the BACKENDS entry that block_forward/block_backward use for q tensors like `t` [b, h, s, d]
    and values `v_head_dim` wide (None: as wide as t)."""
    width = t.size(-1)
    return _backend_for(t.device.type, t.dtype, width, None if v_head_dim in (None, width) else v_head_dim)


def block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of one block: q/k [b, h, sq|sk, d], v [b, h, sk, dv] -> out [b, h, sq, dv], lse [b, h, sq]
    in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    out, lse = BACKENDS[select_backend(q, v.size(-1))].forward(q, k, v, causal, scale)
    return out, lse.to(accumulation_dtype(q))


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the FINAL (merged) out and lse of its query rows: (dq, dk, dv)."""
    return BACKENDS[select_backend(q, v.size(-1))].backward(dout, q, k, v, out, lse, causal, scale)


def reduce_heads(grad: Tensor, rep: int) -> Tensor:
    # [b, np, keys, hn] -> [b, ng, keys, hn] in the accumulation dtype: a shared K/V head gets the
    # sum over its query heads
    b, heads, keys, hn = grad.shape
    return grad.to(accumulation_dtype(grad)).view(b, heads // rep, rep, keys, hn).sum(2)


def accumulation_dtype(t: Tensor) -> torch.dtype:
    # merges and gradient sums run in fp32; fp64 inputs keep fp64 (the CPU kernel wants lse in it)
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------ a block of the ring, or a document: heads and layout


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


def _stride_order(t: Tensor) -> list[int]:
    return sorted(range(t.dim()), key=t.stride, reverse=True)


def _fold(x: Tensor, rep: int) -> Tensor:
    # [b, np, rows, ...] -> [b, ng, rep·rows, ...]: the query heads sharing one K/V head become
    # more rows of that head (exact without a causal mask, where rows are independent)
    b, heads, rows = x.shape[:3]
    return x.reshape(b, heads // rep, rep * rows, *x.shape[3:])


def _unfold(x: Tensor, rep: int) -> Tensor:
    # [b, ng, rep·rows, ...] -> [b, np, rows, ...]
    b, groups, folded = x.shape[:3]
    return x.reshape(b, groups * rep, folded // rep, *x.shape[3:])


def _heads_plan(q: Tensor, kv: tuple[Tensor, Tensor], causal: bool) -> str:
    """How a block meets grouped-query attention (rep query heads per K/V head):

    - 'native': equal head counts, or a kernel that takes fewer K/V heads (`BlockKernels.gqa`);
    - 'fold' (other kernels, unmasked blocks): the rep query heads become rep times the rows of
      their K/V head; exact because no mask ties a row to its position;
    - 'expand' (other kernels, the causal block): K/V copied per query head.

    With the CPU kernel 'native' beat folding on unmasked blocks too: at 8K tokens, 32/8 heads,
    fp32, the peak RSS per rank went from 733 to 701 MiB at CP 2 and from 405 to 389 MiB at CP 4.
    """
    if q.size(1) == kv[0].size(1) or BACKENDS[select_backend(q, kv[1].size(-1))].gqa:
        return "native"
    return "expand" if causal else "fold"


def _block_kv(kv: tuple[Tensor, Tensor], cols: slice, rep: int, expand: bool) -> tuple[Tensor, Tensor]:
    # k, v [b, ng, s/cp, hn] -> [b, ng, keys, hn] (or [b, np, keys, hn], copied per query head)
    k, v = kv[0][:, :, cols], kv[1][:, :, cols]
    if expand:
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return k, v


def _attend_block(
    q: Tensor, kv: tuple[Tensor, Tensor], rows: slice, cols: slice, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """(out, lse) of query rows `rows` against key rows `cols` of kv = (k, v), per query head."""
    rep, plan = q.size(1) // kv[0].size(1), _heads_plan(q, kv, causal)
    k, v = _block_kv(kv, cols, rep, expand=plan == "expand")
    if plan != "fold":
        return block_forward(q[:, :, rows], k, v, causal, scale)
    out, lse = block_forward(_fold(q[:, :, rows], rep), k, v, False, scale)
    return _unfold(out, rep), _unfold(lse, rep)


def _grad_block(
    dout: Tensor,
    q: Tensor,
    kv: tuple[Tensor, Tensor],
    out: Tensor,
    lse: Tensor,
    rows: slice,
    cols: slice,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq [b, np, rows, hn], dk and dv [b, ng, keys, hn]) of one block, given the final out and lse."""
    rep, plan = q.size(1) // kv[0].size(1), _heads_plan(q, kv, causal)
    k, v = _block_kv(kv, cols, rep, expand=plan == "expand")
    if plan == "fold":
        fold = lambda t: _fold(t[:, :, rows], rep)
        dq, dk, dv = block_backward(fold(dout), fold(q), k, v, fold(out), fold(lse), False, scale)
        return _unfold(dq, rep), dk, dv
    dq, dk, dv = block_backward(dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows], causal, scale)
    if plan == "expand":
        dk, dv = reduce_heads(dk, rep), reduce_heads(dv, rep)
    return dq, dk, dv
