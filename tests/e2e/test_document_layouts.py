"""Attention inside documents trains the same model in every layout: with data.reset_attention_mask
and data.reset_position_ids on a corpus of short documents (about six to a sample), each layout's
curve and validation losses equal the one-process run's (tests/e2e/test_layouts.py's bound).

That one-process run is the outside reference's (tests/e2e/test_outside_reference.py: transformers
on each document alone), whose negative control shows the packed curve is far from it, so a layout
that lost the documents (a rank attending across them, positions not restarted) fails here.

tiny_deepseek (multi-latent attention, MoE, its multi-token prediction module) on the same documents at
context 2 (the ring, 4 steps) reproduces its own one-process run: loss, MTP loss, grad norm, balancing
loss, per-expert loads (the MTP layer's included), validation. Its one-process run is checked against
transformers on each document alone (tests/unit/test_mla_documents.py) and the paper's MTP formula on
each document alone (tests/unit/test_mtp_documents.py); Ulysses is in
tests/distributed/test_mtp_context_parallel.py. By hand (2026-12-07), not run here: the same at
tensor 2 + SP × context 2. Negative control, by hand: each context-parallel rank taking its MTP
document starts from the sample's first s/cp positions instead of its own load-balanced chunks
(model/mtp.py:document_starts) is 1.2e-3 off in grad norm at step 1."""

import pytest

from tests.e2e.test_layouts import FP32_REL
from tests.helpers.runs import (
    MASKED,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

DOCUMENTS = ("data.reset_attention_mask=true", "data.reset_position_ids=true")

# The seven layouts in five runs of at most 4 processes: TP2+SP with PP2, CP2 ring with
# DP2, CP4 ring, CP2 a2a, CP4 a2a 2 × p2p 2.
LAYOUTS = {
    "tp2-sp-pp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"]),
    "cp2-ring-dp2": (4, ["parallel.context=2"]),
    "cp4-ring": (4, ["parallel.context=4"]),
    "cp2-a2a": (2, ["parallel.context=2", "parallel.context_comm=a2a"]),
    "cp4-a2a2-p2p2": (4, ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2"]),
}


@pytest.fixture(scope="module")
def document_reference(short_document_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("document-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(short_document_corpus, log_dir, *MASKED, *DOCUMENTS))
    return read_metrics(log_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_documents_in_every_layout_reproduce_single_process(name, document_reference, short_document_corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(short_document_corpus, tmp_path, *MASKED, *DOCUMENTS, *extra))
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, document_reference, rel=FP32_REL)
    assert_close_validation(metrics, document_reference, rel=FP32_REL)
    # the pairs inside documents, counted once over data and context ranks: the same in every layout
    assert_close_curves(metrics, document_reference, rel=1e-12, keys=("attended_fraction",))
    assert 0 < metrics[0]["attended_fraction"] < 0.5


DEEPSEEK_LAYOUT = ["parallel.context=2"]
DEEPSEEK_STEPS = (
    "model.mtp_num_layers=1",
    "train.steps=4",
    "train.eval_interval=4",
    "train.eval_steps=1",
    "checkpoint.save=false",
)
DEEPSEEK_KEYS = ("loss", "grad_norm", "mtp_loss", "moe_seq_aux_loss", "moe_expert_load")


@pytest.mark.slow
def test_mla_and_mtp_on_documents_at_context_2_reproduce_single_process(short_document_corpus, tmp_path):
    curves = {}
    for nproc, layout in ((1, []), (2, DEEPSEEK_LAYOUT)):
        log_dir = tmp_path / f"world{nproc}"
        extra = [*MASKED, *DOCUMENTS, *DEEPSEEK_STEPS, *layout]
        run_pretrain(nproc, "tiny_deepseek", tiny_overrides(short_document_corpus, log_dir, *extra))
        curves[nproc] = read_metrics(log_dir)
    assert all(r["mtp_loss"] > 1.0 for r in curves[1]), curves[1]
    assert_close_curves(curves[2], curves[1], rel=FP32_REL, keys=DEEPSEEK_KEYS)
    assert_close_validation(curves[2], curves[1], rel=FP32_REL)
