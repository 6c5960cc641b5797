"""Activation bytes of one micro-batch on one rank: what each layer's forward keeps for its backward
(per module, under tensor/sequence/context parallelism and recompute), the embedding and the
logits/loss buffers of the last stage, and the largest transient of its backward."""

from __future__ import annotations

import dataclasses

from model.config import Fp8Config, ModelConfig
from model.config import head_dim as model_head_dim
from model.gpt import swiglu_fused

FP32 = 4


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What the bytes depend on beyond the shapes: the device's kernels and the layer implementation.

    `cpu`: torch's composite RMSNorm keeps an fp32 copy of its input and of the normalized input
    whatever the precision (measured); its SDPA output is already laid out as the projection's input.
    `cuda`: torch's fused RMSNorm keeps its input and the fp32 inverse RMS; flash attention's output
    is [b, s, heads, dim], so the projection's [s, b, ...] input is a copy when the micro-batch > 1;
    transformer-engine fuses the norm into the next linear (input, normalized output, inverse RMS).
    `fp8` (transformer-engine layers running FP8 GEMMs): each linear keeps the FP8 copy of its input
    that its weight-gradient GEMM reads, one byte per element, instead of a bf16 one
    (docs/planner.md, "Memory per implementation").
    """

    device: str = "cuda"  # cpu | cuda
    transformer_engine: bool = False
    fp8: bool = False

    @property
    def linear_input_bytes(self) -> int | None:
        """Bytes per element of the input copy a linear keeps for its backward (None: the input itself)."""
        return 1 if self.fp8 and self.transformer_engine else None


def fp8_layer(fp8: Fp8Config, num_layers: int, layer: int) -> bool:
    """Whether decoder layer `layer` runs FP8 GEMMs (fp8.first_last_layers_bf16 keeps both ends bf16)."""
    n = fp8.first_last_layers_bf16
    return fp8.enabled and n <= layer < num_layers - n


@dataclasses.dataclass(frozen=True)
class Shape:
    """One micro-batch as one rank sees it."""

    micro_batch: int
    seq: int  # tokens of one sequence on this rank: seq_length / context
    tensor: int
    sequence_parallel: bool
    dtype_bytes: int  # 4 fp32, 2 bf16/fp16
    expert: int = 1
    expert_tensor: int = 1
    ulysses: int = 1  # ranks of one all-to-all group (parallel.context_comm a2a, a2a+p2p); 1 = none

    @property
    def tokens(self) -> int:
        """Tokens of this micro-batch in tensor-parallel regions (every TP rank sees them all)."""
        return self.micro_batch * self.seq

    @property
    def sharded_tokens(self) -> int:
        """Tokens in norm/dropout/residual regions: split over TP ranks under sequence parallelism."""
        return self.tokens // self.tensor if self.sequence_parallel else self.tokens


def norm_and_linear_input(width: int, tokens: int, shape: Shape, kernels: Kernels) -> int:
    """An RMSNorm and the column-parallel linear after it (which keeps its sequence-parallel shard
    of the input and gathers it again in the backward)."""
    b = shape.dtype_bytes
    if kernels.transformer_engine:
        # TE's LayerNormLinear saves its input, the normalized output (under FP8 the quantized copy:
        # with sequence parallelism the local shard's row-wise bytes, which the backward gathers
        # again; else only the column-wise copy) and rsigma (fp32; RMSNorm has no mean):
        # transformer_engine/pytorch/module/layernorm_linear.py, _LayerNormLinear.forward, TE 2.x
        return tokens * (width * b + width * (kernels.linear_input_bytes or b) + FP32)
    norm = tokens * (2 * width * FP32 + FP32) if kernels.device == "cpu" else tokens * (width * b + FP32)
    return norm + tokens * width * b


def attention_bytes(m: ModelConfig, shape: Shape, kernels: Kernels) -> dict[str, int]:
    """Core attention and its inputs: rotated q and k, v (a view of the fused QKV output, which it
    keeps alive; our ring too saves the view it was given), the output and the fp32 log-sum-exp;
    RoPE's cos/sin per layer. No [s, s] scores: SDPA (flash / memory-efficient) and our ring never
    materialize them. Ulysses (all-to-all over n ranks) keeps instead the head-sharded q, k, v it
    received for the whole sequence (K/V heads copied up to n) and its own output beside the
    output sent back. `_checkpointed`: core_attn + attn_out when the attention is recomputed (the
    checkpoint keeps the module's inputs and output)."""
    if m.attention == "mla":
        return mla_attention_bytes(m, shape, kernels)
    b, t, n = shape.dtype_bytes, shape.tensor, shape.tokens
    heads = m.num_attention_heads
    head_dim = model_head_dim(m)
    groups = m.num_query_groups or heads
    kv = groups * head_dim
    q, out = n * heads * head_dim // t * b, n * heads * head_dim // t * b
    k = n * kv // t * b
    v = n * (heads * head_dim + 2 * kv) // t * b
    if kernels.transformer_engine:
        # TE's DotProductAttention takes q, k, v apart: the rotated q and k are new tensors, v a strided
        # view of the QKV output; their strides differ, so get_qkv_layout finds "not_supported" and
        # makes all three contiguous (attention/dot_product_attention/utils.py, TE 2.x): the backward
        # keeps a [s, b, groups, head_dim] copy of v, and the QKV output is freed
        v = n * kv // t * b
    lse = n * heads // t * FP32
    copy = out if kernels.device == "cuda" and shape.micro_batch > 1 else 0
    if kernels.linear_input_bytes:  # TE's Linear (the projection) keeps its FP8 input beside the kept output
        copy += out // b * kernels.linear_input_bytes  # (module/linear.py, _Linear.forward: saved_inputmat)
    rope = 4 * shape.seq * head_dim * b  # cos and sin, for q and for k, in the activations' dtype
    parts = {"core_attn": q + k + v + lse, "attn_out": out + copy, "rope": rope, "lse": lse}
    parts["_checkpointed"] = q + k + v + out + copy
    if shape.ulysses > 1:  # [s/cp, b, h/t] -> [s/cp·n, b, h/(t·n)]: the same elements, K/V copied up to n heads
        exchanged = n * max(groups // t, shape.ulysses) * head_dim * b
        parts["core_attn"] = q + 2 * exchanged + lse
        parts["attn_out"] = 2 * out + copy
    return parts


def mla_attention_bytes(m: ModelConfig, shape: Shape, kernels: Kernels) -> dict[str, int]:
    """Multi-latent attention (megatron-core's MLASelfAttention, local spec): the latent norms with the
    up-projections after them (the query latent's when q_lora_rank is set; the key/value latent's
    norm input is a view of the down-projection's [latent, RoPE key] output, which it keeps whole
    unless the CPU norm's fp32 copy replaces it); the up-projections' outputs are split, rotated and
    concatenated into new contiguous query, key and value, which the core attention keeps with its
    output and log-sum-exp (no [s, s] scores on a GPU's fused kernel). The latents stay with the
    input norm's sequence-parallel shard."""
    a, b, t, n, n_sp = m.mla, shape.dtype_bytes, shape.tensor, shape.tokens, shape.sharded_tokens
    heads = m.num_attention_heads
    qk, v = heads * (a.qk_head_dim + a.qk_pos_emb_head_dim) // t, heads * a.v_head_dim // t
    out, lse = n * v * b, n * heads // t * FP32
    latents = norm_and_linear_input(a.kv_lora_rank, n_sp, shape, kernels)
    if a.q_lora_rank is not None:
        latents += norm_and_linear_input(a.q_lora_rank, n_sp, shape, kernels)
    if not (kernels.device == "cpu" and b != FP32):
        latents += n_sp * a.qk_pos_emb_head_dim * b
    copy = out if kernels.device == "cuda" and shape.micro_batch > 1 else 0
    qkv = 2 * n * qk * b + n * v * b
    rope = 4 * shape.seq * a.qk_pos_emb_head_dim * b  # cos and sin, for q and for k
    parts = {"core_attn": latents + qkv + lse, "attn_out": out + copy, "rope": rope, "lse": lse}
    parts["_checkpointed"] = latents + qkv + out + copy
    # selective mla_up_proj: q, k, v freed after the core attention, and RoPE's cos and sin not kept (the
    # checkpoint keeps the rotary frequencies [s, 1, 1, rope] fp32 instead)
    parts["_mla_up_freed"] = qkv + rope - shape.seq * a.qk_pos_emb_head_dim * FP32
    return parts


def mlp_bytes(
    ffn: int, tokens: int, split: int, b: int, scaled: bool = False, fused: bool = False, fc2_input: int | None = None
) -> int:
    """SwiGLU MLP without fusion: fc1's output (gate and up; the gate half is a view silu keeps),
    silu(gate), up + 0 (megatron-core's glu offset makes a copy), their product (fc2's input);
    experts also scale by the routing probability before fc2. `fused` (the transformer-engine path:
    megatron-core's bias_swiglu_impl, model/gpt.py:swiglu_fused): one autograd node keeps fc1's
    output only, and fc2 keeps its input, the product. `fc2_input`: bytes per element of fc2's kept
    input when TE's FP8 Linear keeps a one-byte copy (the bf16 product is then freed)."""
    kept_product = fc2_input or b
    if fused:
        return tokens * ffn // split * (2 * b + kept_product)
    return tokens * ffn // split * (b * (5 if scaled else 4) + kept_product)


def dense_layer(m: ModelConfig, shape: Shape, kernels: Kernels) -> dict[str, int]:
    """Bytes one dense layer keeps per micro-batch, by module (recompute takes modules out)."""
    n_sp = shape.sharded_tokens
    attention = attention_bytes(m, shape, kernels)
    dropout = 2 * n_sp * m.hidden_size if m.hidden_dropout > 0 else 0  # bool masks of the two residual adds
    return {
        "input_norm": norm_and_linear_input(m.hidden_size, n_sp, shape, kernels),
        "core_attn": attention["core_attn"],
        "attn_out": attention["attn_out"],
        "lse": attention["lse"],  # inside core_attn; what its recompute drops
        "_checkpointed": attention["_checkpointed"],
        "_mla_up_freed": attention.get("_mla_up_freed", 0),  # MLA: what mla_up_proj recompute frees
        "rope": attention["rope"],
        "pre_mlp_norm": norm_and_linear_input(m.hidden_size, n_sp, shape, kernels),
        "mlp": mlp_bytes(
            m.ffn_hidden_size,
            shape.tokens,
            shape.tensor,
            shape.dtype_bytes,
            fused=swiglu_fused("transformer_engine" if kernels.transformer_engine else "local"),
            fc2_input=kernels.linear_input_bytes,
        ),
        "dropout": dropout,
    }


def moe_layer(m: ModelConfig, shape: Shape, kernels: Kernels) -> dict[str, int]:
    """A MoE layer: attention as dense; router (logits, scores, top-k), token permutation, the
    routed tokens every local expert keeps (balanced routing: each token reaches top_k experts; the
    capacity factor caps that), shared experts."""
    moe, h, b = m.moe, m.hidden_size, shape.dtype_bytes
    assert moe.num_experts is not None
    layer = dense_layer(m, shape, kernels)
    del layer["mlp"]
    n_sp = shape.sharded_tokens  # each (sequence-parallel) rank routes its own tokens
    experts, k = moe.num_experts, moe.top_k
    router = n_sp * (2 * experts * FP32 + k * (2 * 8 + FP32) + FP32) + n_sp * experts * (1 + FP32) + n_sp * k * 8
    if moe.num_groups:  # group-limited routing: each group's top-k indices, the chosen groups, the expert mask
        router += n_sp * (moe.num_groups * (k // (moe.group_top_k or 1)) * 8 + (moe.group_top_k or 1) * 8 + experts)
    if moe.score_function == "sigmoid" and k > 1:  # the top-k sigmoid scores are divided by their sum, kept
        router += n_sp * FP32
    routed = routed_tokens(m, shape)
    ffn = moe.ffn_hidden_size or m.ffn_hidden_size
    experts_bytes = routed * h * b + mlp_bytes(ffn, routed, shape.expert_tensor, b, scaled=True) + routed * FP32
    layer["moe"] = router + experts_bytes
    if moe.grouped_gemm:
        # what moe_act recompute drops (grouped experts only): all but fc1's output of mlp_bytes
        layer["_moe_act"] = 4 * routed * ffn // shape.expert_tensor * b
    if moe.shared_expert_ffn_hidden_size:
        layer["shared_experts"] = mlp_bytes(moe.shared_expert_ffn_hidden_size, shape.tokens, shape.tensor, b)
    return layer


def recompute_saved(parts: dict[str, int], modules: list[str], shape: Shape, m: ModelConfig) -> int:
    """What a layer keeps under selective recompute of `modules` (megatron-core 0.16's checkpoints)."""
    kept = dict(parts)
    b, n_sp = shape.dtype_bytes, shape.sharded_tokens
    if "core_attn" in modules:  # the checkpoint keeps the module's inputs and output, not its log-sum-exp
        kept["core_attn"] = parts["_checkpointed"] - parts["attn_out"]
    if "mla_up_proj" in modules:  # q, k, v freed after the core attention (its checkpoint's inputs too)
        kept["core_attn"] -= parts.get("_mla_up_freed", 0)
    if "layernorm" in modules:  # each norm keeps only its input; its output is dropped and recomputed
        kept["input_norm"] = kept["pre_mlp_norm"] = n_sp * m.hidden_size * b
    if "moe_act" in modules and "moe" not in modules:  # the activation's output is discarded, its input kept
        kept["moe"] -= parts.get("_moe_act", 0)
    for module in ("mlp", "moe", "shared_experts"):
        if module in modules and module in kept:
            kept[module] = 0
    if "moe" in modules and "shared_experts" in kept:  # megatron-core's moe checkpoint runs them inside
        kept["shared_experts"] = 0
    return layer_saved(kept)


def layer_saved(parts: dict[str, int]) -> int:
    """The bytes a layer keeps: every module's, without the parts listed twice (lse, `_` keys)."""
    return sum(v for k, v in parts.items() if k != "lse" and not k.startswith("_"))


def recompute_transient(parts: dict[str, int], modules: list[str]) -> int:
    """What a layer's backward recomputes (its saved bytes exist again meanwhile)."""
    rerun: dict[str, tuple[str, ...]] = {"core_attn": ("lse",), "layernorm": ("input_norm",), "mlp": ("mlp",)}
    # moe: the whole layer's checkpoint (transformer/moe/moe_layer.py custom_forward), shared experts included
    rerun |= {"moe": ("moe", "shared_experts"), "shared_experts": () if "moe" in modules else ("shared_experts",)}
    rerun["moe_act"] = () if "moe" in modules else ("_moe_act",)
    rerun["mla_up_proj"] = ("_mla_up_freed",)
    return sum(sum(parts.get(p, 0) for p in rerun.get(mod, ())) for mod in modules)


def backward_transient(m: ModelConfig, shape: Shape, is_moe: bool, gloo: bool = False) -> int:
    """Short-lived bytes at the worst point of one layer's backward (its kept bytes still live).

    Dense: fc1's backward, with the gradient of its output and its weight gradient (a fresh tensor
    before it is added to the fp32 buffer: no gradient-accumulation fusion). MoE: the token
    exchange's gradient buffers (the all-to-all's input and output; under expert tensor
    parallelism the all-gather that undoes the combine's reduce-scatter, in the routing
    probabilities' fp32 when training in bf16, through a list of pieces and a concatenation on
    gloo, then cast back), or the experts' fc1 backward, whichever is larger: one expert's at a
    time, or with grouped GEMMs all local experts' at once (every routed token's output gradient
    and the whole stack's weight gradient)."""
    b, h = shape.dtype_bytes, m.hidden_size
    # Ulysses' attention backward: the send and receive buffers of one all-to-all of [s/cp, b, h/t]
    ulysses = 2 * shape.tokens * h // shape.tensor * b if shape.ulysses > 1 else 0
    if not is_moe:
        return max(2 * m.ffn_hidden_size // shape.tensor * b * (shape.tokens + h), ulysses)
    moe = m.moe
    ffn = moe.ffn_hidden_size or m.ffn_hidden_size
    routed = routed_tokens(m, shape)
    local = max((moe.num_experts or 1) // shape.expert, 1)
    grouped = local if moe.grouped_gemm else 1  # experts whose fc1 backward runs at once
    expert = 2 * ffn // shape.expert_tensor * b * (routed // local * grouped + h * grouped)
    exchange = 2 * shape.sharded_tokens * moe.top_k * h * b
    if shape.expert_tensor > 1:
        probs = FP32 if b != FP32 else b
        exchange += routed * h * (probs * (2 if gloo else 1) + b)
    return max(expert, exchange, ulysses)


def routed_tokens(m: ModelConfig, shape: Shape) -> int:
    """Token copies one rank's experts compute per micro-batch: every (sequence-parallel) rank routes
    its tokens to top_k experts, an expert-parallel rank gets its share (balanced routing: as many as
    it sent), gathered over the expert-tensor group; a capacity factor caps each expert."""
    moe = m.moe
    routed = shape.sharded_tokens * moe.top_k * shape.expert_tensor
    if moe.capacity_factor is not None:
        capacity = int(moe.capacity_factor * routed)
        routed = capacity if moe.pad_to_capacity else min(routed, capacity)
    return routed


def logits_and_loss(m: ModelConfig, vocab: int, shape: Shape, kernels: Kernels) -> tuple[int, int]:
    """(kept, transient) of the last stage's head per micro-batch: the final norm and the output
    layer's input; vocabulary-parallel cross entropy keeps the fp32 softmax [s, b, vocab/tp] (the
    logits themselves when fp32: it works in place) and per-token target bookkeeping. Transient: in
    bf16/fp16 the logits before their fp32 copy, or the gradient cast back to their dtype, next to
    the output layer's weight gradient."""
    b, n = shape.dtype_bytes, shape.tokens
    v = vocab // shape.tensor
    kept = norm_and_linear_input(m.hidden_size, shape.sharded_tokens, shape, kernels)
    kept += n * v * FP32 + n * (1 + 8)  # softmax; the target mask and the targets in this rank's vocabulary
    cast = n * v * b if b != FP32 else 0
    return kept, cast + v * m.hidden_size * b
