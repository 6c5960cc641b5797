"""tiny_deepseek (multi-latent attention, group-limited sigmoid routing with the expert bias, a shared
expert, a dense first layer) with one multi-token prediction module at every layout: each curve equals
the single-process one, the MTP loss included. Layouts are
combined, four forked runs of 4 ranks covering tensor + sequence, pipeline (uneven and virtual),
expert, expert × tensor (experts whole or split), data, context (ring and Ulysses, with MLA's value
heads narrower than its query/key heads, and MTP's roll across context-parallel ranks), the
distributed optimizer, FSDP and recompute (full, and selective with MLA's up-projections)."""

import pytest

from tests.helpers.runs import assert_close_curves, assert_close_validation, read_metrics, run_pretrain, tiny_overrides

# fp32 on CPU: another layout only reorders additions of the same numbers. Measured (2026-12-07, 4
# steps): every run below within 1.0e-7 of one process (loss, grad norm, balancing loss), the
# per-expert loads and the expert-bias range identical (and by hand, not run here: PP2, VPP2, FSDP,
# DP2 with the distributed optimizer each alone, <= 1.5e-7). Negative control, by hand: without the
# upstream fix MLASelfAttention.get_query_key_value_tensors (upstream/fixes.py; the RoPE key's
# gradient left partial across tensor ranks) the tensor-parallel run is 2.5e-5 off in grad norm at
# step 1 and a per-expert load 2.4e-2 off by step 3; CP2 ring attention with its softmax scale taken
# from the value width (1/sqrt(16)) instead of MLA's query/key width (1/sqrt(24)) is 4.0e-5 off in
# loss, 1.6e-4 in grad norm and 3.0e-2 in a per-expert load by step 4. With the MTP module (measured
# 2026-12-07): mtp_loss within 1.1e-7, grad norm within 2.5e-7 (FSDP × CP2 Ulysses), the rest as
# above, the MTP layer's loads identical; MTP's labels and loss mask rolled inside each
# context-parallel rank (no exchange across ranks) is 1.2e-3 off in grad norm at step 1 in both CP runs.
FP32_REL = 1e-5
KEYS = (
    "loss",
    "grad_norm",
    "moe_seq_aux_loss",
    "moe_load_cv",
    "moe_expert_load",
    "moe_expert_bias_min",
    "moe_expert_bias_max",
    "mtp_loss",
)
# 4 steps, loss-token counts that differ between micro-batches and ranks, a validation at step 4; no
# checkpoint (an export from these layouts is tests/distributed/test_hf_layouts.py's)
STEPS = [
    "train.steps=4",
    "model.mtp_num_layers=1",
    "data.eod_mask_loss=true",
    "data.split=90,10,0",
    "train.eval_interval=4",
    "train.eval_steps=1",
    "checkpoint.save=false",
]
SELECTIVE = "model.recompute_modules=[layernorm,moe,shared_experts,mla_up_proj]"
LAYOUTS = {
    # name: overrides, each on 4 forked ranks
    "tp2-sp-pp2-uneven-ep2-full-recompute": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.pipeline=2",
        "parallel.first_stage_layers=1",
        "parallel.expert=2",
        "parallel.expert_tensor=1",
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
    ],
    "pp2-vpp2-cp2-ring-selective-recompute": [
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
        "parallel.context=2",
        "model.recompute_granularity=selective",
        SELECTIVE,
    ],
    "fsdp-ep2-cp2-ulysses": [
        "parallel.fsdp=zero3",
        "parallel.expert=2",
        "parallel.context=2",
        "parallel.context_comm=a2a",
    ],
    "tp2-sp-dp2-ep2-etp2-distributed-optimizer": [
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        "parallel.expert=2",
        "parallel.distributed_optimizer=true",
    ],
}


@pytest.fixture(scope="module")
def deepseek_reference(synthetic_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("deepseek-reference")
    run_pretrain(1, "tiny_deepseek", tiny_overrides(synthetic_corpus, log_dir, *STEPS))
    return read_metrics(log_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_process(name, deepseek_reference, synthetic_corpus, tmp_path):
    run_pretrain(4, "tiny_deepseek", tiny_overrides(synthetic_corpus, tmp_path, *STEPS, *LAYOUTS[name]))
    metrics = read_metrics(tmp_path)
    # layer 1 is dense (first_dense_layers); layer 5 is the MTP module's
    assert set(metrics[0]["moe_expert_load"]) == {"2", "3", "4", "5"}
    assert_close_curves(metrics, deepseek_reference, rel=FP32_REL, keys=KEYS)
    assert_close_validation(metrics, deepseek_reference, rel=FP32_REL)
