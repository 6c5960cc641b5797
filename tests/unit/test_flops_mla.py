"""planning/flops.py for multi-latent attention: FLOPs per token against torch's own FLOP counter
over a built tiny DeepSeek-V3-style model (MLA with a query latent, a dense and a MoE layer), as
tests/unit/test_metrics.py checks the standard attention."""

import dataclasses

import pytest
import torch

from model.attention.mla import MlaConfig
from model.config import ModelConfig
from model.moe_config import MoeConfig
from planning.flops import attention_flops_per_pair, layer_forward_flops
from pretrain.metrics import flops_per_token


def _tiny_mla(q_lora_rank: int | None, mtp: int = 0) -> ModelConfig:
    moe = MoeConfig(num_experts=4, top_k=2, ffn_hidden_size=32, shared_expert_ffn_hidden_size=32, first_dense_layers=1)
    mla = MlaConfig(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        seq_length=16,
        attention="mla",
        mla=mla,
        moe=moe,
        mtp_num_layers=mtp,
    )


@pytest.mark.parametrize(
    "q_lora_rank, mtp", [(32, 0), (None, 0), (32, 1)], ids=["query_latent", "full_rank_query", "mtp"]
)
def test_mla_flops_per_token_counts_what_torch_counts(megatron_single_process, q_lora_rank, mtp):
    """FlopCounterMode over one forward + backward counts every matmul, MLA's attention included (on
    the CPU its unequal Q/K and V widths run through SDPA's math path, whose bmm's torch counts): the
    whole score square where ours counts the causal half, 3 · layers · s · (qk + v) widths per token.
    So torch's count is exactly ours plus that half. With MTP: its module's projection, its (MoE)
    layer and its pass through the output layer. Negative controls (by hand): with attention_widths'
    MLA branch removed (heads · hidden/heads widths) it fails: 12,288 attention FLOPs, not 13,824;
    with mtp_forward_flops returning 0 the MTP case is 286,464 FLOPs a token short."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.gpt import ModelBuild, build_model_chunks

    model, vocab, batch = _tiny_mla(q_lora_rank, mtp), 128, 2
    (chunk,) = build_model_chunks(model, ModelBuild(), vocab)
    tokens = torch.randint(0, vocab, (batch, model.seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(model.seq_length).expand(batch, -1)
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    try:
        with FlopCounterMode(display=False) as counter:
            chunk(tokens, positions, None, labels=tokens).sum().backward()
    finally:
        # MoE routers record their losses in a process-wide tracker sized by this model's layers
        get_moe_layer_wise_logging_tracker().clear()
    counted = counter.get_total_flops() / (batch * model.seq_length)
    attention = attention_flops_per_pair(model) * model.seq_length / 2
    assert attention == 3 * (model.num_layers + mtp) * model.seq_length * 4 * (24 + 12)
    assert counted == flops_per_token(model, vocab) + attention
    # the standard formula's attention linears differ: a model that ignored MLA would fail above
    standard = layer_forward_flops(dataclasses.replace(model, attention="standard"), False)["attention_linears"]
    assert standard != layer_forward_flops(model, False)["attention_linears"]
