"""Every parallel layout trains the same model: each curve equals the single-process reference.

The reference is tiny_gpt on one process (tests/conftest.py). Each layout below runs the same
recipe under torchrun with gloo; losses and grad norms must match at every step. What makes this
hold: vocabulary padding independent of the tensor size and per-layer init seeds (model/),
batch_p2p_comm off on gloo (the interleaved-schedule trap), per-token loss normalization.
"""

import pytest

from tests.distributed import assert_close_curves, read_metrics, run_pretrain, tiny_overrides

# The bound for fp32. Measured differences are far below (see docs/benchmarks.md-free note
# on the issue): these layouts only reorder additions of the same fp32 numbers.
FP32_REL = 1e-4

LAYOUTS = {
    # name: (processes, overrides)
    "tp2": (2, ["parallel.tensor=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2-uneven": (2, ["parallel.pipeline=2", "parallel.first_stage_layers=1"]),
    "pp2-vpp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "pp4": (4, ["parallel.pipeline=4"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reproduces_single_process(name, reference, synthetic_corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra))
    _, expected = reference
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, expected, rel=FP32_REL)


@pytest.mark.slow
def test_tp2_pp2_dp2_on_8_processes(reference, synthetic_corpus, tmp_path):
    """The widest layout: 8 gloo processes on a 2-core machine (slow, still in CI)."""
    extra = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.distributed_optimizer=true"]
    run_pretrain(8, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra), timeout=600)
    _, expected = reference
    assert_close_curves(read_metrics(tmp_path), expected, rel=FP32_REL)


def test_pipeline_metrics_report_bubble_and_micro_batches(synthetic_corpus, tmp_path):
    run_pretrain(2, "tiny_gpt", tiny_overrides(
        synthetic_corpus, tmp_path, "parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.steps=1"))
    (record,) = read_metrics(tmp_path)
    # 4 micro-batches (8 samples / micro 2), 2 stages × 2 chunks: (2 - 1) / (2·4 + 2 - 1).
    assert record["micro_batches"] == 4
    assert record["pipeline_bubble"] == pytest.approx(1 / 9)


# bf16: each layout rounds partial sums to 8 mantissa bits at different places (TP splits the
# matmul reductions, PP moves activations between stages in bf16), so curves drift apart by a few
# bf16 ulps (2^-8 ≈ 0.4 %) per step. Measured over 10 steps: see BF16_* and the issue note. The
# bounds are ~3× the largest measured difference, and ~10× below the gap to the fp32 curve at
# step 10, so a real bug (wrong scaling, a missed all-reduce) still fails.
BF16_LOSS_REL = 5e-3
BF16_GRAD_NORM_REL = 3e-2


@pytest.fixture(scope="module")
def bf16_reference(synthetic_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("bf16-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, "train.precision=bf16"))
    return read_metrics(log_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2-sp", "pp2-vpp2"])
def test_bf16_layout_tracks_bf16_single_process(name, bf16_reference, synthetic_corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, "train.precision=bf16", *extra))
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, bf16_reference, rel=BF16_LOSS_REL, keys=("loss",))
    assert_close_curves(metrics, bf16_reference, rel=BF16_GRAD_NORM_REL, keys=("grad_norm",))
