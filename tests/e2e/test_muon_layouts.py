"""optimizer.name = muon at every layout: each curve equals the single-process Muon curve (which
tests/e2e/test_muon_reference.py holds to torch.optim.Muon + AdamW). Muon orthogonalizes whole
matrices, which these layouts split: tensor parallelism (QKV and the gated fc1 split per rank; the
shards are gathered), the distributed optimizer (flat ranges of a matrix on different ranks), FSDP
(rows on different ranks), experts (each expert's matrices apart, sequential or stacked by grouped
experts, split by expert tensor parallelism). A resume at another layout continues the curve;
AdamW's state is not Muon's.

Measured (2026-12-07, fp32 Newton-Schulz): every layout within 1.5e-7 of one process; with
Newton-Schulz in bf16 (optimizer.ns_dtype=bf16) the same layouts are 1e-4 to 5e-4 apart (rounding
flips of the momentum's last bits), which is why fp32 is the default. Negative control (by hand):
without the gather of the tensor-parallel shards (each rank orthogonalizing its own shard) TP2 is
2.2e-4 off in loss and 9.6e-4 in grad norm at step 2, 7e-3 in loss by step 7.

tiny_gpt's schedule has its own decay_steps, so a shorter run is a prefix of the reference's curve."""

import pytest

from tests.helpers.runs import (
    MASKED,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

REL = 1e-5
MUON = ("optimizer.name=muon",)


@pytest.fixture(scope="module")
def muon_reference(synthetic_corpus, tmp_path_factory):
    """tiny_gpt with Muon on one process (MASKED: unequal token counts, validation), checkpointed at
    step 5 for the resume below; (log dir, metrics)."""
    log_dir = tmp_path_factory.mktemp("muon-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, *MASKED, *MUON, "checkpoint.interval=5"))
    return log_dir, read_metrics(log_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, extra, steps",
    [
        (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"], 10),
        (2, ["parallel.fsdp=zero3"], 5),
    ],
    ids=["tp2-sp-pp2", "fsdp-zero3-dp2"],
)
def test_layout_reproduces_single_process(nproc, extra, steps, muon_reference, synthetic_corpus, tmp_path):
    overrides = tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *MUON, *extra, f"train.steps={steps}")
    run_pretrain(nproc, "tiny_gpt", overrides)
    assert_close_curves(read_metrics(tmp_path), muon_reference[1][:steps], rel=REL)
    assert_close_validation(read_metrics(tmp_path), muon_reference[1][:steps], rel=REL)


@pytest.mark.slow
def test_resume_with_the_distributed_optimizer_at_cp2_dp2_continues_the_curve(
    muon_reference, synthetic_corpus, tmp_path
):
    """Saved by one process at step 5 (plain optimizer), resumed on 4 ranks (context 2 x data 2) with
    the distributed optimizer, whose ranges of a matrix lie on different ranks."""
    saved = muon_reference[0] / "checkpoints" / "iter_0000005"
    extra = ["parallel.context=2", "parallel.distributed_optimizer=true", f"checkpoint.load={saved}"]
    run_pretrain(4, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *MUON, *extra))
    assert_close_curves(read_metrics(tmp_path), muon_reference[1][5:], rel=REL)


# tiny_moe with 6 experts in 3 layers: the distributed optimizer's halves of the expert buffer then
# end inside an expert's slice of a stack (with 8 experts in 4 layers they end between layers)
EXPERTS = ("optimizer.name=muon", "model.moe.num_experts=6", "model.num_layers=3", "train.steps=4")
GROUPED = ("model.moe.grouped_gemm=true", "parallel.distributed_optimizer=true", "parallel.sequence_parallel=true")


@pytest.mark.slow
def test_experts_reproduce_single_process_grouped_or_not(synthetic_corpus, tmp_path):
    """Sequential experts on one process (each expert's fc1 [gate; up] and fc2 orthogonalized on
    their own) against grouped experts, whose [experts, out, in] stacks are stepped expert by expert:
    on one process; at expert parallelism 2 x expert tensor parallelism 2 with the distributed
    optimizer; at expert tensor parallelism 2 x expert data parallelism 2 with the distributed
    optimizer, whose flat ranges cut layer 1's fc1 stack inside expert 1.

    Measured (2026-12-07, 6 steps): grouped one process equal in loss, grad norm within 5.5e-10;
    both layouts within 4.3e-8 in loss and 6.8e-8 in grad norm. Negative controls (by hand, failing
    this test): each stack's gate (up, fc2) orthogonalized as one [experts x rows, cols] matrix, 3.4e-5
    off in loss at step 2; the stacks left to AdamW (the old silent behaviour), 1.3e-3 at step 2; each
    expert's fc1 orthogonalized whole, not [gate; up] apart, 8.1e-5 in grad norm at step 4; at EP2 x
    ETP2 each rank orthogonalizing its own shard of an expert (no gather), 4.5e-5 in loss at step 2."""
    run_pretrain(1, "tiny_moe", tiny_overrides(synthetic_corpus, tmp_path / "one", *EXPERTS))
    reference = read_metrics(tmp_path / "one")
    runs = {
        "grouped": (1, ["model.moe.grouped_gemm=true"]),
        "ep2-etp2": (4, [*GROUPED, "parallel.expert=2", "parallel.tensor=2"]),
        "etp2-edp2": (4, [*GROUPED, "parallel.tensor=2"]),
    }
    for name, (nproc, extra) in runs.items():
        run_pretrain(nproc, "tiny_moe", tiny_overrides(synthetic_corpus, tmp_path / name, *EXPERTS, *extra))
        assert_close_curves(read_metrics(tmp_path / name), reference, rel=REL)


@pytest.mark.slow
def test_adamw_checkpoint_is_refused_by_muon(reference, synthetic_corpus, tmp_path):
    saved = reference[0] / "checkpoints" / "iter_0000010"
    overrides = tiny_overrides(synthetic_corpus, tmp_path, *MUON, f"checkpoint.load={saved}")
    proc = run_pretrain(1, "tiny_gpt", overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint '{saved}' holds adamw's optimizer state and this run has optimizer.name = muon; "
        "resume with optimizer.name = adamw, or start muon from its weights only (tools/convert_hf.py export, then import)"
    )
