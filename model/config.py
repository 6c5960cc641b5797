"""The `model` and `fp8` recipe sections (Llama-style decoder, optional mixture of experts, FP8
GEMMs) and their checks against the parallel layout and the training precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.errors import RecipeError, require_divides
from common.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from model.attention.mla import MlaConfig, check_mla
from model.moe_config import MoeConfig, check_moe, moe_layer_pattern
from model.mtp import check_mtp
from model.rope import RopeScalingConfig, check_rope_scaling
from parallel.config import ParallelConfig, check_sharding, check_uneven_pipeline, pipeline_stage_layers

# Selective recompute modules megatron-core 0.16 offers our layers: core_attn = the attention kernel; layernorm =
# both norms (recomputed from the input); mlp = a dense layer's MLP; moe = a whole MoE layer; moe_act = the grouped
# experts' activation; shared_experts; mla_up_proj = MLA's up-projections and RoPE (recomputed from the latents).
RecomputeModule = Literal["core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts", "mla_up_proj"]


@dataclass
class ModelConfig:
    """Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP (or mixture of experts)."""

    num_layers: PositiveInt = 2
    hidden_size: PositiveInt = 64
    ffn_hidden_size: PositiveInt = 176  # SwiGLU inner size
    num_attention_heads: PositiveInt = 4
    num_query_groups: PositiveInt | None = None  # None = same as heads (MHA); < heads = grouped-query attention
    head_dim: PositiveInt | None = None  # width of one attention head (kv_channels); None = hidden_size / heads
    attention: Literal["standard", "mla"] = "standard"  # standard: multi-head / grouped-query; mla: model.mla
    mla: MlaConfig = field(default_factory=MlaConfig)
    mtp_num_layers: NonNegativeInt = 0  # multi-token prediction modules (DeepSeek-V3, model/mtp.py); 0 = none
    mtp_loss_scaling_factor: NonNegativeFloat = 0.1  # the MTP loss's weight (over its modules' mean) in training
    qk_layernorm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    vocab_size: PositiveInt | None = None  # None = the tokenizer's vocabulary (data.tokenizer); padded later
    make_vocab_size_divisible_by: PositiveInt = 128  # padding multiple (times parallel.tensor), as Megatron-LM
    seq_length: PositiveInt = 128  # tokens per sample
    rotary_base: PositiveFloat = 10000.0  # RoPE theta
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: PositiveFloat = 1e-5  # RMSNorm epsilon
    untie_embeddings: bool = True  # True = separate output layer; False = share the input embedding
    init_method_std: PositiveFloat = 0.02  # std of the normal weight init
    hidden_dropout: Probability = 0.0
    attention_dropout: Probability = 0.0
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    add_bias_linear: bool = False  # biases in attention and MLP/expert linears (GPT-2 style); Llama has none
    # Activation recompute (megatron-core's names): keep fewer activations and rerun their forward in the
    # backward pass. null = none; full = whole layers (recompute_method, recompute_num_layers); selective =
    # the recompute_modules of every layer.
    recompute_granularity: Literal["full", "selective"] | None = None
    # selective: what to recompute; null = megatron-core's default [core_attn]
    recompute_modules: list[RecomputeModule] | None = None
    # full: uniform = checkpoint groups of recompute_num_layers layers (only each group's input is kept);
    # block = recompute only the first recompute_num_layers layers of each model chunk
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: PositiveInt | None = None  # full only: layers per group (uniform) or per chunk (block)
    moe: MoeConfig = field(default_factory=MoeConfig)


FP8_RECIPES_LOCAL = ("tensorwise", "rowwise")  # current scaling through torch._scaled_mm (model/fp8/linear.py)
# transformer-engine versions megatron-core 0.16 needs for each recipe (fp8_utils.py, get_fp8_recipe)
FP8_RECIPES_TE = {"delayed": "1.7", "tensorwise": "2.2", "blockwise": "2.3", "mxfp8": "2.1"}


@dataclass
class Fp8Config:
    """FP8 GEMMs in the decoder layers' linears (QKV, output projection, fc1, fc2, experts); the
    embedding, output layer, router, norms, softmax, loss, master weights and optimizer stay
    bf16/fp32. What runs where: docs/fp8.md."""

    enabled: bool = False
    # hybrid: e4m3 forward operands (activations, weights), e5m2 gradients; e4m3: e4m3 for all three
    format: Literal["hybrid", "e4m3"] = "hybrid"
    # The FP8 scaling recipe (megatron-core's and transformer-engine's name, kept as the key; not the
    # run recipe, which the code calls `recipe`). tensorwise / rowwise: current scaling, one scale per
    # tensor / per row (local spec or, tensorwise, transformer-engine); delayed: scales from an amax
    # history (transformer-engine); blockwise: 128-element blocks (transformer-engine, Hopper); mxfp8:
    # 32-element blocks (transformer-engine, Blackwell)
    recipe: Literal["tensorwise", "rowwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    amax_history_len: PositiveInt | None = None  # delayed only: steps of amax history; null = 1
    # delayed only: the history's largest amax (max) or its last (most_recent); null = most_recent
    amax_compute_algo: Literal["most_recent", "max"] | None = None
    margin: NonNegativeInt | None = None  # delayed only: scales shrink by 2^margin; null = 0
    first_last_layers_bf16: NonNegativeInt = 0  # decoder layers at each end whose GEMMs stay bf16; 0 = none
    params: bool = False  # FP8 primary weights (transformer-engine's fp8_param): less memory, needs transformer-engine


def check_fp8(fp8: Fp8Config, model: ModelConfig, parallel: ParallelConfig, precision: str) -> None:
    """Each recipe × implementation either runs FP8 or is refused here (the device is checked at
    run time, model/fp8/linear.py:check_runtime); nothing when fp8.enabled is false."""
    if not fp8.enabled:
        return
    if precision != "bf16":
        raise RecipeError(f"fp8.enabled = true requires train.precision = bf16, got {precision}")
    local = model.transformer_impl == "local"
    if local and fp8.recipe not in FP8_RECIPES_LOCAL:
        raise RecipeError(
            f"fp8.recipe = {fp8.recipe} needs model.transformer_impl = transformer_engine "
            f"(transformer-engine >= {FP8_RECIPES_TE[fp8.recipe]}); the local spec runs tensorwise and rowwise"
        )
    if not local and fp8.recipe not in FP8_RECIPES_TE:
        raise RecipeError(
            f"fp8.recipe = {fp8.recipe} runs on the local spec only (model.transformer_impl = local); "
            f"transformer-engine's recipes are {' | '.join(FP8_RECIPES_TE)}"
        )
    if local and fp8.params:
        raise RecipeError("fp8.params = true (FP8 primary weights) needs model.transformer_impl = transformer_engine")
    for key in ("amax_history_len", "amax_compute_algo", "margin"):
        if getattr(fp8, key) is not None and fp8.recipe != "delayed":
            raise RecipeError(
                f"fp8.{key} applies to fp8.recipe = delayed only; {fp8.recipe} scales from the current amax"
            )
    _check_fp8_layers(fp8, model, parallel)
    if local and model.attention == "mla":
        raise RecipeError("fp8 on the local spec is not built for model.attention = mla (its latent projections)")
    if local and model.moe.num_experts is not None:
        if model.moe.grouped_gemm:
            raise RecipeError(
                "fp8 on the local spec has no grouped-GEMM experts (torch._scaled_grouped_mm has no CPU "
                "kernel to verify them against): set model.moe.grouped_gemm = false, or transformer_impl = "
                "transformer_engine"
            )
        _check_fp8_local_experts(parallel)


def _check_fp8_layers(fp8: Fp8Config, model: ModelConfig, parallel: ParallelConfig) -> None:
    n = fp8.first_last_layers_bf16
    if n == 0:
        return
    if fp8.recipe == "delayed":  # megatron-core refuses it: per-layer FP8 contexts break its amax reduction
        raise RecipeError("fp8.first_last_layers_bf16 cannot be combined with fp8.recipe = delayed")
    if 2 * n >= model.num_layers:
        raise RecipeError(
            f"fp8.first_last_layers_bf16 = {n} at each end leaves no FP8 layer in model.num_layers = {model.num_layers}"
        )
    per_stage = model.num_layers // parallel.pipeline
    if model.transformer_impl == "transformer_engine" and n > per_stage:
        raise RecipeError(
            f"fp8.first_last_layers_bf16 = {n} exceeds the {per_stage} layers of a pipeline stage "
            "(megatron-core's limit with transformer-engine)"
        )


def _check_fp8_local_experts(p: ParallelConfig) -> None:
    """The local FP8 experts reduce amaxes over the ranks that split one micro-batch's tokens; an
    expert fed from several data-parallel ranks would scale over tokens no single-process run
    groups together, so its numerics would change with the layout."""
    if p.expert > 1:
        raise RecipeError(
            f"fp8 on the local spec needs parallel.expert = 1, got {p.expert}: an expert's FP8 scales would span "
            "the tokens of several data-parallel ranks, changing its numerics with the layout "
            "(use model.transformer_impl = transformer_engine)"
        )
    if p.expert_tensor is not None and p.expert_tensor != p.tensor:
        raise RecipeError(
            f"fp8 on the local spec needs parallel.expert_tensor = parallel.tensor, got {p.expert_tensor} "
            f"and {p.tensor}"
        )


def check_model(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Shapes against the parallel sizes; run after parallel.check()."""
    parallel.check()
    _check_shape(model, parallel)
    check_moe(model, parallel)
    check_sharding(parallel, model.moe.num_experts, model.transformer_impl)
    _check_recompute(model, parallel)
    check_mla(model, parallel)
    check_mtp(model)


def _check_shape(m: ModelConfig, p: ParallelConfig) -> None:
    heads = "model.num_attention_heads"
    if m.head_dim is None:
        require_divides(heads, m.num_attention_heads, "model.hidden_size", m.hidden_size)
    check_rope_scaling(m.rope_scaling)
    if m.num_query_groups is not None:
        require_divides("model.num_query_groups", m.num_query_groups, heads, m.num_attention_heads)
    require_divides("parallel.tensor", p.tensor, heads, m.num_attention_heads)
    if m.num_query_groups is not None:
        require_divides("parallel.tensor", p.tensor, "model.num_query_groups", m.num_query_groups)
    if p.first_stage_layers is not None or p.last_stage_layers is not None:
        check_uneven_pipeline(p, m.num_layers)
    elif p.virtual_pipeline is None:
        require_divides("parallel.pipeline", p.pipeline, "model.num_layers", m.num_layers)
    else:
        require_divides(
            "parallel.pipeline × parallel.virtual_pipeline",
            p.pipeline * p.virtual_pipeline,
            "model.num_layers",
            m.num_layers,
        )
    if p.context > 1:
        _check_context(m, p)
    if p.sequence_parallel:
        require_divides("parallel.tensor", p.tensor, "model.seq_length / parallel.context", m.seq_length // p.context)


def _check_context(m: ModelConfig, p: ParallelConfig) -> None:
    # each sequence is split into 2 × context chunks (load-balanced causal attention)
    require_divides("2 × parallel.context", 2 * p.context, "model.seq_length", m.seq_length)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    groups_key = "model.num_query_groups" if m.num_query_groups else "model.num_attention_heads"
    if m.transformer_impl == "transformer_engine":
        if p.context_comm in ("a2a", "a2a+p2p"):  # TE's all-to-all splits the query groups
            a2a_key, a2a = _a2a_size(p)
            require_divides(f"parallel.tensor × {a2a_key}", p.tensor * a2a, groups_key, groups)
        return
    if p.context_comm == "all_gather":
        raise RecipeError(
            "parallel.context_comm = all_gather needs model.transformer_impl = transformer_engine; "
            "the local layers do p2p, a2a and a2a+p2p"
        )
    if m.attention_dropout > 0:
        # The ring's block kernels have none. Ulysses could drop in its SDPA call, but megatron-core's
        # model-parallel random stream is per tensor rank: the CP ranks, holding different heads,
        # would draw the same masks.
        if p.context_comm == "a2a":
            what = "has no attention dropout (its CP ranks would draw one mask stream for different heads)"
        else:
            what = "uses ring attention, which has no attention dropout"
        raise RecipeError(
            f"parallel.context = {p.context} with parallel.context_comm = {p.context_comm} {what}: "
            f"set model.attention_dropout = 0 (got {m.attention_dropout})"
        )
    if p.context_comm == "p2p":
        return
    # Ulysses: each all-to-all rank takes a share of the heads a tensor rank holds
    a2a_key, a2a = _a2a_size(p)
    why = f"(parallel.context_comm = {p.context_comm} gives each of those ranks a share of the"
    if (heads // p.tensor) % a2a:
        raise RecipeError(
            f"{a2a_key} = {a2a} does not divide model.num_attention_heads / parallel.tensor = "
            f"{heads // p.tensor} {why} query heads)"
        )
    rank_groups = groups // p.tensor
    if rank_groups % a2a and a2a % rank_groups:
        raise RecipeError(
            f"{a2a_key} = {a2a} and {groups_key} / parallel.tensor = {rank_groups} do not divide one another "
            f"{why} K/V heads, split or copied)"
        )


def _a2a_size(p: ParallelConfig) -> tuple[str, int]:
    """(key, size) of one all-to-all group: the whole context group with a2a, context_a2a with a2a+p2p."""
    if p.context_comm == "a2a+p2p":
        assert p.context_a2a is not None  # ParallelConfig.check refused a2a+p2p without it
        return "parallel.context_a2a", p.context_a2a
    return "parallel.context", p.context


def head_dim(model: ModelConfig) -> int:
    """The width of one attention head (megatron-core's kv_channels)."""
    return model.head_dim or model.hidden_size // model.num_attention_heads


def _check_recompute(m: ModelConfig, p: ParallelConfig) -> None:
    """What megatron-core 0.16 refuses (with an assertion or a ValueError at model build) or would
    silently ignore, refused here in one line."""
    granularity = m.recompute_granularity
    if granularity != "full":
        for key in ("recompute_method", "recompute_num_layers"):
            if getattr(m, key) is not None:
                raise RecipeError(
                    f"model.{key} is only used with model.recompute_granularity = full, got {granularity or 'null'}"
                )
    if granularity != "selective" and m.recompute_modules is not None:
        raise RecipeError(
            f"model.recompute_modules is only used with model.recompute_granularity = selective, "
            f"got {granularity or 'null'}"
        )
    if granularity == "full":
        _check_full_recompute(m, p)
    elif granularity == "selective":
        _check_selective_recompute(m)


def _check_full_recompute(m: ModelConfig, p: ParallelConfig) -> None:
    if m.recompute_method is None or m.recompute_num_layers is None:
        raise RecipeError(
            "model.recompute_granularity = full needs model.recompute_method (uniform | block) and "
            "model.recompute_num_layers"
        )
    n = m.recompute_num_layers
    for chunk in sorted(set(chunk_layer_counts(m, p))):
        if n > chunk:
            raise RecipeError(
                f"model.recompute_num_layers = {n} exceeds the {chunk} layers of a model chunk "
                f"(a pipeline stage, or one virtual stage of it)"
            )
        if m.recompute_method == "uniform" and chunk % n:
            raise RecipeError(
                f"model.recompute_num_layers = {n} does not divide the {chunk} layers of a model chunk "
                f"(recompute_method = uniform checkpoints groups of that many layers)"
            )


def chunk_layer_counts(m: ModelConfig, p: ParallelConfig) -> list[int]:
    """Layers in each model chunk: every virtual stage of every pipeline rank, in pipeline-rank order."""
    vpp = p.virtual_pipeline or 1
    return [n // vpp for n in pipeline_stage_layers(p, m.num_layers) for _ in range(vpp)]


def _check_selective_recompute(m: ModelConfig) -> None:
    modules = m.recompute_modules if m.recompute_modules is not None else ["core_attn"]
    if not modules:
        raise RecipeError("model.recompute_modules is empty: name at least one module, or set recompute_granularity")
    if len(set(modules)) != len(modules):
        raise RecipeError(f"model.recompute_modules lists a module twice: {modules}")
    pattern = moe_layer_pattern(m)
    missing = {
        "mlp": ("no dense layer (every layer is MoE: use moe)", all(pattern)),
        "moe": ("no MoE layer", not any(pattern)),
        "moe_act": (
            "no grouped-GEMM experts (megatron-core recomputes the activation only there)",
            not m.moe.grouped_gemm,
        ),
        "shared_experts": (
            "no shared experts (model.moe.shared_expert_ffn_hidden_size)",
            m.moe.shared_expert_ffn_hidden_size is None or not any(pattern),
        ),
        "layernorm": (
            "no separate norm with model.transformer_impl = transformer_engine (its norms are fused "
            "into the dense layers' linears)",
            m.transformer_impl == "transformer_engine" and not any(pattern),
        ),
        "mla_up_proj": ("no multi-latent attention (model.attention = mla)", m.attention != "mla"),
    }
    for module in modules:
        why, absent = missing.get(module, ("", False))
        if absent:
            raise RecipeError(f"model.recompute_modules: {module} has nothing to recompute: the model has {why}")
