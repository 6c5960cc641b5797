"""Every parallel layout trains the same model: each curve equals the single-process reference.

The reference is tiny_gpt on one process (tests/conftest.py, masked_reference: loss-token counts
that differ between micro-batches and ranks, validation at steps 5 and 10). Each layout below runs
the same recipe under torchrun with gloo; losses, grad norms and validation losses must match. What
makes this hold: vocabulary padding independent of the tensor size and per-layer init seeds
(model/), batch_p2p_comm off on gloo (the interleaved-schedule trap), per-token loss normalization.
"""

import pytest
import torch

from tests.helpers.runs import (
    MASKED,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

# The issue asks for 1e-4; measured (2026-11-23) at most 5.4e-8 for losses and 8.1e-7 for grad
# norms over all layouts here: they only reorder additions of the same fp32 numbers. 1e-5 keeps a
# >10x margin and catches drifts the bound would let through.
FP32_REL = 1e-5

LAYOUTS = {
    # name: (processes, overrides). Also on the curve, with their validation losses, elsewhere:
    # pp2, pp4, cp2 and cp2 a2a (the two sides of test_checkpoint.py's resumes at another layout),
    # tp2 x pp2 (test_tp2_pp2_dp2_on_8_processes, with data parallelism beside it).
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2-uneven": (2, ["parallel.pipeline=2", "parallel.first_stage_layers=1"]),
    "pp2-uneven-last": (2, ["parallel.pipeline=2", "parallel.last_stage_layers=1"]),
    "pp2-vpp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    # context parallelism: our ring attention (model/attention/ring.py) on the load-balanced layout
    "cp4": (4, ["parallel.context=4"]),
    "cp2-tp2": (4, ["parallel.context=2", "parallel.tensor=2"]),
    "cp2-pp2": (4, ["parallel.context=2", "parallel.pipeline=2"]),
    # 4 processes / CP 2 = data-parallel 2: gradients reduce over data × context ranks
    "cp2-dp2-distopt": (4, ["parallel.context=2", "parallel.distributed_optimizer=true"]),
    # Ulysses (model/attention/ulysses.py). tiny_gpt has 4 query heads on 2 K/V heads: CP 2 splits the K/V
    # heads, CP 4 copies each to 2 ranks (one query head per rank); at TP2 each tensor rank has 2
    # query heads on 1 K/V head, copied to both all-to-all ranks. a2a+p2p at CP 4 with TP2 and PP2
    # is one 16-process run (as long as two 8-process ones, one run fewer).
    "cp4-a2a": (4, ["parallel.context=4", "parallel.context_comm=a2a"]),
    "cp2-a2a-tp2-pp2": (
        8,
        ["parallel.context=2", "parallel.context_comm=a2a", "parallel.tensor=2", "parallel.pipeline=2"],
    ),
    "cp4-a2a2-p2p2-tp2-pp2": (
        16,
        ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2"]
        + ["parallel.tensor=2", "parallel.pipeline=2"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_process(name, masked_reference, synthetic_corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *extra))
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, masked_reference, rel=FP32_REL)
    assert_close_validation(metrics, masked_reference, rel=FP32_REL)


EIGHT_HEADS = ["model.num_attention_heads=8", "model.num_query_groups=2"]


@pytest.fixture(scope="module")
def eight_head_reference(synthetic_corpus, tmp_path_factory):
    """masked_reference's run with 8 query heads on 2 K/V heads (head size 8): a2a at CP 4 with TP2
    needs 4 query heads per tensor rank, tiny_gpt has 2."""
    log_dir = tmp_path_factory.mktemp("eight-head-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, *MASKED, *EIGHT_HEADS))
    return read_metrics(log_dir)


@pytest.mark.slow
def test_cp4_a2a_tp2_pp2_on_16_processes(eight_head_reference, masked_reference, synthetic_corpus, tmp_path):
    """Ulysses over 4 ranks beside TP2 and PP2: each rank gets one of a tensor rank's 4 query heads
    and a copy of its one K/V head."""
    extra = ["parallel.context=4", "parallel.context_comm=a2a", "parallel.tensor=2", "parallel.pipeline=2"]
    run_pretrain(16, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *EIGHT_HEADS, *extra), timeout=600)
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, eight_head_reference, rel=FP32_REL)
    assert_close_validation(metrics, eight_head_reference, rel=FP32_REL)
    # the reference is not tiny_gpt's: the 8 heads make another model
    assert abs(eight_head_reference[-1]["loss"] - masked_reference[-1]["loss"]) > 1e-3


@pytest.mark.slow
def test_tp2_pp2_dp2_on_8_processes(masked_reference, synthetic_corpus, tmp_path):
    """The widest layout: 8 gloo processes on a 2-core machine (slow, still in CI)."""
    extra = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.distributed_optimizer=true"]
    run_pretrain(8, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *extra), timeout=600)
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, masked_reference, rel=FP32_REL)
    assert_close_validation(metrics, masked_reference, rel=FP32_REL)


def test_pipeline_metrics_report_bubble_and_micro_batches(synthetic_corpus, tmp_path):
    run_pretrain(
        2,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus, tmp_path, "parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.steps=1"
        ),
    )
    (record,) = read_metrics(tmp_path)
    # 4 micro-batches (8 samples / micro 2), 2 stages × 2 chunks: (2 - 1) / (2·4 + 2 - 1).
    assert record["micro_batches"] == 4
    assert record["pipeline_bubble"] == pytest.approx(1 / 9)


# bf16: parameters are bf16 but gradients are reduced and the optimizer steps in fp32, so layouts
# differ only where bf16 partial results are rounded at different places (TP splits matmul
# reductions, SP and PP move bf16 activations). Measured over 10 steps (2026-11-23): loss within
# 4.0e-5 and grad norm within 3.8e-4 of the one-process bf16 run. The bounds are 5x those, and
# still below the bf16-vs-fp32 gap (loss 5.6e-4, grad norm 2.6e-3), so a layout that silently
# computed in another precision, or lost a reduction, fails.
BF16_LOSS_REL = 2e-4
BF16_GRAD_NORM_REL = 2e-3


@pytest.fixture(scope="module")
def bf16_reference(synthetic_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("bf16-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, "train.precision=bf16"))
    return log_dir, read_metrics(log_dir)


def test_bf16_is_not_fp32(bf16_reference, reference):
    """The control for the bf16 layout tests: train.precision=bf16 really trains in bf16. Its
    parameters are bf16 (as the checkpoint stores them, beside fp32 master weights) and its curve is
    off the fp32 one by far more than fp32 layouts differ (1e-7): measured 3.2e-4 at most."""
    import pickle

    log_dir, bf16 = bf16_reference
    metadata = pickle.loads((log_dir / "checkpoints" / "iter_0000010" / ".metadata").read_bytes())
    dtypes = {
        key: meta.properties.dtype
        for key, meta in metadata.state_dict_metadata.items()
        if key.endswith("linear_fc1.weight")
    }
    assert dtypes["decoder.layers.mlp.linear_fc1.weight"] == torch.bfloat16  # the model's own parameters
    assert dtypes["optimizer.state.fp32_param.decoder.layers.mlp.linear_fc1.weight"] == torch.float32  # master
    gaps = [abs(b["loss"] - f["loss"]) / f["loss"] for b, f in zip(bf16, reference[1])]
    assert max(gaps) > 1e-4, gaps


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2-sp", "pp2-vpp2"])
def test_bf16_layout_tracks_bf16_single_process(name, bf16_reference, synthetic_corpus, tmp_path):
    _, bf16_reference = bf16_reference
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, "train.precision=bf16", *extra))
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, bf16_reference, rel=BF16_LOSS_REL, keys=("loss",))
    assert_close_curves(metrics, bf16_reference, rel=BF16_GRAD_NORM_REL, keys=("grad_norm",))
