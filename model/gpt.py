"""recipe.model -> megatron-core TransformerConfig + layer spec -> GPTModel chunks (Llama-style)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from common.errors import UserError
from model.config import Fp8Config, ModelConfig, head_dim
from model.moe_config import moe_layer_pattern
from model.precision import Precision
from model.rope import scale_rope
from parallel.layout import Layout

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class ModelBuild:
    """What the model builder needs beyond recipe.model: the layout and the numerics."""

    layout: Layout = dataclasses.field(default_factory=lambda: Layout(world_size=1))
    precision: Precision = Precision()  # train.precision
    perform_initialization: bool = True
    init_seed: int = 1234  # per-layer init streams derive from it (model/layers.py)
    batch_p2p_comm: bool = True  # False on gloo: see transformer_config
    overlap_p2p_comm: bool = False  # parallel.overlap_p2p_comm resolved (interleaved pipelines only)
    compile: tuple[str, ...] = ()  # train.compile: torch.compile of layers, or of their mlp / norms
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)  # recipe.fp8 (checked: model/config.py)
    document_positions: bool = False  # data.reset_position_ids: RoPE at position_ids (model/attention/documents.py)


def swiglu_fused(transformer_impl: str) -> bool:
    """megatron-core's fused SwiGLU (bias_swiglu_impl, bias_activation_fusion): on for
    transformer-engine layers, as Megatron-LM and Megatron-Bridge run them (GPU only; their kernels
    are TE's, not the local path's anyway); off for the local spec, whose golden losses are exact
    (the fused kernel's bf16 rounding differs from silu(a) * b by an ulp). The memory model reads it
    (planning/activations.py:mlp_bytes): fused, the MLP keeps 3 ffn-sized tensors per token, not 5."""
    return transformer_impl == "transformer_engine"


def padded_vocab_size(model: ModelConfig, vocab_size: int, tensor: int) -> int:
    """Rounds up to a multiple of lcm(make_vocab_size_divisible_by, tensor).

    Megatron-LM pads to a multiple of divisible_by × tensor, so the model (its padded rows, hence
    its init and softmax) changes with the layout. With the least common multiple the padded size
    is the same for every tensor size that divides divisible_by (1, 2, 4, … 128 for the default),
    and each rank's shard is still a whole number of rows.
    """
    multiple = math.lcm(model.make_vocab_size_divisible_by, tensor)
    return -(-vocab_size // multiple) * multiple


def mask_padded_logits(output_layer: torch.nn.Module, vocab_size: int, padded_vocab: int, tp_rank: int) -> None:
    """Padded vocabulary entries never carry probability: their logits become -inf in the output
    layer's output, so the loss, evaluation and sampling all see a softmax over the real `vocab_size`
    ids only (as an exported model, which drops the padded rows, does).

    Without it the padded rows (zero on import, random from scratch) take probability mass: a Hugging
    Face Llama of 257 ids padded to 384 trains 7 % above transformers' loss from the first step. The
    fill is in place on this rank's shard (or on the gathered logits at inference), so it costs no
    copy, and the masked entries get no gradient.
    """
    if vocab_size >= padded_vocab:
        return

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        logits = output[0]  # [s, b, padded/tp] (or the whole padded vocabulary when gathered)
        shard = logits.size(-1)
        start = 0 if shard == padded_vocab else tp_rank * shard
        first_padded = max(vocab_size - start, 0)
        if first_padded < shard:
            logits[..., first_padded:] = float("-inf")
        return output

    output_layer.register_forward_hook(hook)


def transformer_config(model: ModelConfig, build: ModelBuild) -> TransformerConfig:
    """A megatron-core TransformerConfig for a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, MoE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from model.moe import transformer_config_fields
    from model.mtp import mtp_config_fields

    fp8_fields = {}
    if build.fp8.enabled:
        from model.fp8.linear import transformer_config_fields as fp8_config_fields

        fp8_fields = fp8_config_fields(build.fp8, model)

    dtype, layout = build.precision.dtype, build.layout
    config_class, mla_fields = TransformerConfig, {}
    if model.attention == "mla":
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        from model.attention.mla import mla_config_fields

        config_class, mla_fields = (
            MLATransformerConfig,
            mla_config_fields(model.mla, model.rotary_base, model.rope_scaling),
        )
    return config_class(
        # Which layers the spec builds; megatron-core's torch FSDP wrapper picks the modules it
        # shards by it (torch_fully_sharded_data_parallel.py:113).
        transformer_impl=model.transformer_impl,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=head_dim(model),
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        # Fusions need apex or TE; the unfused paths are exact and portable.
        bias_activation_fusion=swiglu_fused(model.transformer_impl),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        **layout.transformer_config_fields(),
        # Fully sharded: the parameters are the fp32 master weights, and FSDP gathers them in the
        # training precision for compute (parallel/data_parallel.py).
        params_dtype=torch.float32 if layout.fsdp else dtype,
        pipeline_dtype=dtype,
        bf16=build.precision.bf16,
        fp16=build.precision.fp16,
        calculate_per_token_loss=True,
        # gloo + batched isend/irecv gives silently wrong gradients with interleaved pipelines
        # (docs/megatron-core-on-cpu.md, "Silent traps"); NCCL batches correctly.
        batch_p2p_comm=build.batch_p2p_comm,
        overlap_p2p_comm=build.overlap_p2p_comm,
        # Each chunk's output freed once sent to the next stage (its autograd graph stays): as
        # Megatron-LM and Megatron-Bridge always run; the memory model counts it so
        # (planning/memory.py:chunk_bytes). On gloo an overlapped send needs upstream/gloo_p2p.py.
        deallocate_pipeline_outputs=True,
        use_cpu_initialization=True,  # CPU init is also what makes init TP-size invariant
        perform_initialization=build.perform_initialization,
        **recompute_fields(model),
        **transformer_config_fields(model, build.precision),
        **fp8_fields,
        **mla_fields,
        **mtp_config_fields(model),
    )


def recompute_fields(model: ModelConfig) -> dict[str, Any]:
    """The TransformerConfig fields for activation recompute (model/config.py checked them)."""
    if model.recompute_granularity is None:
        return {}
    fields: dict[str, Any] = {"recompute_granularity": model.recompute_granularity}
    if model.recompute_granularity == "full":
        fields.update(recompute_method=model.recompute_method, recompute_num_layers=model.recompute_num_layers)
    else:
        fields["recompute_modules"] = list(model.recompute_modules or ["core_attn"])
    return fields


def layer_spec(
    model: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
    init_seed: int = 0,
    fp8: Fp8Config | None = None,
    cp_group: Any = None,
) -> Any:
    """The transformer block spec: our local layers (their linears in FP8 where `fp8` asks for it),
    or transformer-engine's when asked for. `cp_group`: the context-parallel group FP8 amaxes span."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if model.transformer_impl == "transformer_engine":
        return _te_layer_spec(config, vp_stage)
    from model.layers import RMSNorm

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    pattern = moe_layer_pattern(model)[offset : offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    specs = [_local_layer_spec(config, init_seed, model.moe.num_experts if is_moe else None) for is_moe in pattern]
    if fp8 is not None and fp8.enabled:
        from model.fp8.linear import fp8_layer, gemms_for, to_fp8

        gemms = gemms_for(fp8, cp_group)
        for number, spec in enumerate(specs, start=offset + 1):  # global layer numbers, 1-based
            if fp8_layer(fp8, number, model.num_layers):
                to_fp8(spec, gemms)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def _local_layer_spec(config: TransformerConfig, init_seed: int, num_experts: int | None) -> ModuleSpec:
    """megatron-core's local layer with our seeded layer, RMSNorm, SDPA/ring attention and experts."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from model.attention.sdpa import SDPAttention
    from model.layers import RMSNorm, SeededTransformerLayer

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    spec.module = SeededTransformerLayer
    spec.params = {**spec.params, "init_seed": init_seed}
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if config.qk_layernorm:  # per head, over head_dim; megatron-core sums their gradients over TP ranks
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if config.multi_latent_attention:
        from model.attention.mla import use_mla

        use_mla(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if config.context_parallel_size > 1:
        # megatron-core's local attention refuses context parallelism (TE-only upstream): ours
        # is a ring over the CP group (model/attention/ring.py), or Ulysses' all-to-all, alone or
        # with the ring across its groups (model/attention/ulysses.py).
        from model.attention.ring import RingAttention
        from model.attention.ulysses import UlyssesAttention

        ulysses = config.cp_comm_type in ("a2a", "a2a+p2p")
        spec.submodules.self_attention.submodules.core_attention = UlyssesAttention if ulysses else RingAttention
    if num_experts is not None:
        from model.moe import ExpertRowParallelLinear, SeededSequentialMLP

        experts = spec.submodules.mlp.submodules.experts
        if config.moe_grouped_gemm:
            from model.grouped_experts import GroupedExperts  # torch._grouped_mm, no transformer-engine

            experts.module = GroupedExperts
        else:
            experts.module = SeededSequentialMLP
        experts.submodules.linear_fc2 = ExpertRowParallelLinear
    return spec


def _te_layer_spec(config: TransformerConfig, vp_stage: int | None) -> Any:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise UserError(
            "model.transformer_impl: transformer_engine needs transformer-engine, which is not "
            "installed: pip install '.[gpu]' on a CUDA machine, or set model.transformer_impl=local"
        ) from None
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if config.num_moe_experts is None:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    # Dense and MoE layers by config.moe_layer_freq; grouped-GEMM experts when moe_grouped_gemm.
    return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage)


def build_model_chunks(
    model: ModelConfig, build: ModelBuild, vocab_size: int, groups: Any | None = None
) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one chunk without interleaving).

    `groups`: megatron-core's ProcessGroupCollection for `build.layout` (default: the one
    parallel_state holds, which must be initialized for the same sizes).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel.utils import (
        is_pp_first_stage,
        is_pp_last_stage,
        is_vp_first_stage,
        is_vp_last_stage,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = groups or ProcessGroupCollection.use_mpu_process_groups()
    config = transformer_config(model, build)
    vpp = build.layout.virtual_pipeline
    padded = padded_vocab_size(model, vocab_size, build.layout.tensor)
    model_class: type = GPTModel
    if build.document_positions:
        from model.attention.documents import gpt_model_with_positions

        model_class = gpt_model_with_positions()
    if model.mtp_num_layers:
        from model.mtp import with_documents_in_mtp

        model_class = with_documents_in_mtp(model_class)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        post_process = is_pp_last_stage(groups.pp) and is_vp_last_stage(stage, vpp)
        chunk = model_class(
            config=config,
            transformer_layer_spec=layer_spec(model, config, stage, build.init_seed, build.fp8, groups.cp),
            mtp_block_spec=_mtp_spec(model, config, build.init_seed) if post_process else None,
            vocab_size=padded,
            max_sequence_length=model.seq_length,
            pre_process=is_pp_first_stage(groups.pp) and is_vp_first_stage(stage, vpp),
            post_process=post_process,
            share_embeddings_and_output_weights=not model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,  # a float theta (1e6, 5e5, or not whole) as transformers has it
            vp_stage=stage,
            pg_collection=groups,
        )
        scale_rope(chunk, model.rope_scaling)
        if chunk.post_process:
            mask_padded_logits(chunk.output_layer, vocab_size, padded, groups.tp.rank())
        chunks.append(chunk)
    return chunks


def _mtp_spec(model: ModelConfig, config: TransformerConfig, init_seed: int) -> Any:
    """The MTP block on the last stage (model/mtp.py); its layer is MoE where a layer at index
    num_layers would be (HF's model.layers.{num_hidden_layers})."""
    if not model.mtp_num_layers:
        return None
    from model.mtp import mtp_block_spec

    is_moe = moe_layer_pattern(dataclasses.replace(model, num_layers=model.num_layers + 1))[-1]
    return mtp_block_spec(
        _local_layer_spec(config, init_seed, model.moe.num_experts if is_moe else None), model.mtp_num_layers
    )


def build_model(
    model: ModelConfig, build: ModelBuild, vocab_size: int, device: torch.device, groups: Any
) -> list[torch.nn.Module]:
    """This rank's model chunks on `device` in the training precision (bf16/fp16 inside megatron-core's
    Float16Module; fp32 master weights when fully sharded, whose wrapper casts them), initialized from
    `build.init_seed` as at every other layout."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(build.init_seed)
    model_parallel_cuda_manual_seed(build.init_seed)
    chunks = [c.to(device) for c in build_model_chunks(model, build, vocab_size, groups)]
    for chunk in chunks:
        compile_layers(chunk, build.compile)
    if build.compile and torch.distributed.get_rank() == 0:
        print(f"torch.compile: {', '.join(build.compile)} of every transformer layer", flush=True)
    if build.precision.half and not build.layout.fsdp:
        chunks = [Float16Module(c.config, c) for c in chunks]
    return chunks


def compile_layers(chunk: Any, targets: tuple[str, ...]) -> None:
    """torch.compile, in place, each decoder layer of `chunk` (`layers`), or its MLP (`mlp`) and its
    RMSNorms (`norms`); `chunk` is a GPTModel. A failure to compile raises at the first step: never a
    silent eager run."""
    if not targets:
        return
    import warnings

    import torch._dynamo  # only here: importing it costs every process about 0.5 s of CPU

    # megatron-core warns inside a layer's forward; a warning would split the graph there
    torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)
    for layer in chunk.decoder.layers:
        if "layers" in targets:
            layer.compile()
        if "mlp" in targets:
            layer.mlp.compile()
        if "norms" in targets:
            layer.input_layernorm.compile()
            layer.pre_mlp_layernorm.compile()


@contextlib.contextmanager
def meta_device():
    """Builds modules without allocating their weights (parameter counting, `--dry-run`)."""
    with torch.device("meta"):
        yield


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    total: int  # MTP modules included
    active: int  # what one token passes through the main model: top_k routed experts (+ shared)
    mtp: int = 0  # the multi-token prediction modules' own (the embedding and output head are shared)


def layer_parameters(
    model: ModelConfig, is_moe: bool, tensor: int = 1, expert_tensor: int | None = None, experts: int | None = None
) -> int:
    """One decoder layer's parameters on one rank (no split: the whole layer).

    `tensor` splits attention and dense/shared MLPs (column-parallel biases too; row-parallel
    biases, norms and the router are replicated); `expert_tensor` (default `tensor`) splits each
    routed expert; `experts` is how many routed experts are counted (default all of them: the
    ones one expert-parallel rank holds, or the top_k one token passes through).
    """
    h, moe, bias = model.hidden_size, model.moe, int(model.add_bias_linear)
    heads, d = model.num_attention_heads, head_dim(model)
    groups = model.num_query_groups or heads
    qkv = (heads + 2 * groups) * d

    def mlp(ffn: int, split: int) -> int:  # SwiGLU: fc1 to 2·ffn (gate and up), fc2 back to h
        return (3 * h * ffn + bias * 2 * ffn) // split + bias * h

    attention = (h * qkv + heads * d * h + bias * qkv) // tensor + bias * h
    if model.attention == "mla":
        from model.attention.mla import mla_parameters

        attention = mla_parameters(model.mla, h, heads, tensor)
    norms = 2 * h + (2 * d if model.qk_layernorm else 0)
    if not is_moe:
        return attention + mlp(model.ffn_hidden_size, tensor) + norms
    expert = mlp(moe.ffn_hidden_size or model.ffn_hidden_size, expert_tensor or tensor)
    shared = mlp(moe.shared_expert_ffn_hidden_size, tensor) if moe.shared_expert_ffn_hidden_size else 0
    assert moe.num_experts is not None, "an MoE layer needs model.moe.num_experts"
    router = moe.num_experts * (h + bias)
    routed = moe.num_experts if experts is None else experts
    return attention + routed * expert + shared + router + norms


def parameter_counts(model: ModelConfig, vocab_size: int) -> ParameterCount:
    """Hand formula for the Llama-style decoder, dense or MoE, with or without linear biases, and
    its MTP modules (model/mtp.py)."""
    from model.mtp import mtp_parameters

    h = model.hidden_size
    embeddings = vocab_size * h * (2 if model.untie_embeddings else 1)
    pattern = moe_layer_pattern(model)
    total = sum(layer_parameters(model, is_moe) for is_moe in pattern) + h + embeddings
    active = (
        sum(layer_parameters(model, is_moe, experts=model.moe.top_k if is_moe else None) for is_moe in pattern)
        + h
        + embeddings
    )
    mtp_moe = moe_layer_pattern(dataclasses.replace(model, num_layers=model.num_layers + 1))[-1]
    mtp = model.mtp_num_layers * mtp_parameters(model, layer_parameters(model, mtp_moe))
    return ParameterCount(total=total + mtp, active=active, mtp=mtp)
