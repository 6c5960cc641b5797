"""The planner (planning/step_time.py) and the dry-run memory model (planning/memory.py) against runs
others published (docs/planner.md, "Published runs"): every layout that ran must fit on its GPU, and
each predicted tokens/s/GPU must be within 20 % of the published figure, the median within 10 %.

The rows run as published: Megatron-LM's README runs --tp-comm-overlap (parallel.tp_comm_overlap on
every row with TP > 1), Megatron-Bridge's Llama3-70B H100 config a userbuffers config.

Negative control (by hand, 2026-12-07): with parallel.tp_comm_overlap off on those rows the 16B and
32B rows fall back to 0.89 and 0.85 and the pipeline rows to 1.04-1.12. With the data-parallel
overlap switched off (parallel.overlap_grad_reduce=false, overlap_param_gather=false on every DDP row) the 16B and 32B
rows fall to 0.77 and 0.74 of the published throughput and the 20 % bound fails; the model before
(a flat 55 % of peak, every collective exposed, no FP8) had a median ratio of 0.72 (issue 33). For
the fit: with the transformer-engine path counted as the local one (planning/activations.py's TE and
FP8 terms off) the Llama3-70B FP8 layout needs 109.6 GiB and test_published_layout_fits fails. With
the userbuffers counted (planning/te_memory.py) that layout needs 81.1 GiB with each chunk's pipeline
output kept, 79.62 GiB with it freed once sent (deallocate_pipeline_outputs, as that run and ours do),
79.65 GiB with overlap_p2p_comm's receive posted ahead (planning/schedule.py:overlap_held): its fit is a
strict xfail (DOES_NOT_FIT)."""

import statistics

import pytest

from planning.gpus import GPUS
from planning.memory import estimate_setup, setup_for
from planning.report import reserve_bytes
from planning.step_time import step_time
from pretrain.recipe import load_recipe

H100_GIB = GPUS["h100"].memory_gib  # 79.1: what PyTorch can allocate from on an H100 80GB (planning/gpus.py)
MEGATRON_VOCAB = 131072
LLAMA3_VOCAB = 128256


def _megatron_lm(layers, hidden, heads, tp, pp, batch, tflops):
    """A row of Megatron-LM's README weak-scaling table (GELU MLP of 4h, MHA, seq 4096, DP 48) as our
    SwiGLU model with the same parameters and FLOPs (ffn = 8h/3, rounded to 64); the published
    TFLOP/s per GPU turned into tokens/s per GPU with Megatron-LM's own FLOPs per token,
    72·l·h²·(1 + s/(6h) + V/(12·h·l))."""
    ffn = round(8 * hidden / 3 / 64) * 64
    overrides = [
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={ffn}",
        f"model.num_attention_heads={heads}",
        "model.num_query_groups=null",
        f"model.vocab_size={MEGATRON_VOCAB}",
        "model.seq_length=4096",
        f"parallel.tensor={tp}",
        f"parallel.pipeline={pp}",
        "parallel.virtual_pipeline=null",
        "parallel.context=1",
        f"parallel.sequence_parallel={str(tp > 1).lower()}",
        f"parallel.tp_comm_overlap={str(tp > 1).lower()}",  # the README: --tp-comm-overlap (TP > 1 only)
        f"train.global_batch_size={batch}",
        "train.micro_batch_size=1",
    ]
    per_token = 72 * layers * hidden**2 * (1 + 4096 / (6 * hidden) + MEGATRON_VOCAB / (12 * hidden * layers))
    return overrides, tp * pp * 48, MEGATRON_VOCAB, tflops * 1e12 / per_token


LLAMA3_70B_FP8 = (  # Megatron-Bridge 25.11, DGX-H100, FP8-CS: TP4 PP8 VP5, GBS 128, MBS 1, seq 8192
    [
        f"model.vocab_size={LLAMA3_VOCAB}",
        "parallel.tensor=4",
        "parallel.pipeline=8",
        "parallel.virtual_pipeline=5",
        "parallel.context=1",
        "parallel.tp_comm_overlap=true",  # llama3_70b_h100_config: userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192
        "train.global_batch_size=128",
        "fp8.enabled=true",
        "fp8.recipe=tensorwise",
        # Megatron-Bridge's bf16_with_fp8_current_scaling_mixed: FP8 primary weights (fp8_param_gather)
        # and the first and last decoder layers in bf16
        "fp8.params=true",
        "fp8.first_last_layers_bf16=1",
    ],
    64,
    LLAMA3_VOCAB,
    1602.0,
)
LLAMA3_8B_FP8 = (  # Megatron-Bridge 25.11, DGX-H100, FP8-CS: FSDP, GBS 128, MBS 1, seq 8192, recompute 5 layers
    [
        "model.num_layers=32",
        "model.hidden_size=4096",
        "model.ffn_hidden_size=14336",
        "model.num_attention_heads=32",
        "model.num_query_groups=8",
        f"model.vocab_size={LLAMA3_VOCAB}",
        "model.transformer_impl=local",  # our FSDP is verified on the local spec only
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "parallel.virtual_pipeline=null",
        "parallel.context=1",
        "parallel.sequence_parallel=false",
        "parallel.distributed_optimizer=false",
        "parallel.fsdp=zero3",
        "train.global_batch_size=128",
        "fp8.enabled=true",
        "fp8.recipe=tensorwise",
        "fp8.first_last_layers_bf16=1",  # bf16_with_fp8_current_scaling_mixed (no fp8.params: local spec)
        "model.recompute_granularity=full",
        "model.recompute_method=block",
        "model.recompute_num_layers=5",
    ],
    8,
    LLAMA3_VOCAB,
    14451.0,
)
PUBLISHED = {
    "megatron-lm 1.7B": _megatron_lm(24, 2048, 16, 1, 1, 192, 408.8),
    "megatron-lm 7.1B": _megatron_lm(30, 4096, 32, 2, 1, 192, 465.9),
    "megatron-lm 16B": _megatron_lm(32, 6144, 48, 4, 1, 192, 489.1),
    "megatron-lm 32B": _megatron_lm(48, 7168, 56, 8, 1, 192, 459.6),
    "megatron-lm 70B": _megatron_lm(84, 8192, 64, 8, 2, 384, 419.7),
    "megatron-lm 119B": _megatron_lm(92, 10240, 80, 8, 4, 768, 420.5),
    "megatron-lm 177B": _megatron_lm(96, 12288, 96, 8, 6, 1152, 432.8),
    "megatron-lm 314B": _megatron_lm(96, 16384, 128, 8, 8, 1536, 474.4),
    "megatron-lm 462B": _megatron_lm(112, 18432, 144, 8, 16, 3072, 459.9),
    "bridge llama3-70b fp8": LLAMA3_70B_FP8,
    "bridge llama3-8b fp8": LLAMA3_8B_FP8,
}


def _score(name):
    overrides, gpus, vocab, published = PUBLISHED[name]
    recipe = load_recipe("llama70b", overrides)
    setup = setup_for(recipe, gpus, None, vocab)
    time = step_time(setup, GPUS["h100"])
    worst = estimate_setup(setup).worst
    needed = (worst.peak + reserve_bytes(worst, setup.target)) / 2**30
    predicted = recipe.train.global_batch_size * recipe.model.seq_length / time.total / gpus
    return predicted / published, needed


@pytest.fixture(scope="module")
def scores():
    return {name: _score(name) for name in PUBLISHED}


DOES_NOT_FIT = {
    "bridge llama3-70b fp8": "needs 79.65 GiB of 79.1: transformer-engine's userbuffers (parallel.tp_comm_overlap) "
    "take 2.5 GiB, an FP8 set and a bf16 set for the bf16 first and last layers; freeing the pipeline outputs "
    "once sent, as that run did, gave back 1.5 GiB of it; 0.5 GiB over, inside the assumed 5.3 GiB reserve, and no "
    "overcount was found (docs/planner.md, 'Predictions')",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=DOES_NOT_FIT[name]))
        if name in DOES_NOT_FIT
        else name
        for name in PUBLISHED
    ],
)
def test_published_layout_fits(scores, name):
    assert scores[name][1] <= H100_GIB


def test_throughput_within_20_percent(scores):
    errors = {name: abs(ratio - 1) for name, (ratio, _) in scores.items()}
    assert max(errors.values()) <= 0.20, errors


@pytest.mark.xfail(
    strict=True,
    reason="median error 12.0 %: with --tp-comm-overlap modelled (TE's userbuffers) the 16B and 32B rows come to "
    "0.90-0.91, but the pipeline rows (70B-462B) and both FP8 rows come out 6-18 % fast and no missing mechanism "
    "was found for them; left for a GPU measurement (docs/planner.md, 'Predictions')",
)
def test_throughput_median_within_10_percent(scores):
    errors = {name: abs(ratio - 1) for name, (ratio, _) in scores.items()}
    assert statistics.median(errors.values()) <= 0.10, errors
