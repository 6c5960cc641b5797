"""Multi-token prediction on packed samples of documents (model/mtp.py:with_documents_in_mtp, with
data.reset_attention_mask, reset_position_ids and eod_mask_loss): the MTP loss megatron-core tracks
and the MTP projection's gradient of a packed sample equal the DeepSeek-V3 paper's formula
(tests/unit/test_mtp.py:_formula) applied to each document alone: position i predicts token i+2
from the main model's output h_i and the embedding of token i+1, where both i+1 and the target's
position are in i's document, and the target counts where the LM loss at i+1 counts. A document's
labels are the LM's (its last is the next document's first token, masked by eod_mask_loss).

Negative control: the same packed sample through a model whose MTP rolls across document ends
(megatron-core's plain roll, the model before this fix) moves the MTP loss far beyond the bound."""

import dataclasses

import pytest
import torch

from tests.unit.test_mla import _tiny_deepseek
from tests.unit.test_mtp import VOCAB, _formula

SCALE = 0.3
LENGTHS = [5, 9, 4, 6]  # documents of the packed sample, each ending at its EOD
EOD = 0


def _sample():
    """tokens [1, s+1], document ids and restarted positions [1, s], the eod_mask_loss mask [1, s]."""
    from data.dataset import document_ids

    seq = sum(LENGTHS)
    tokens = torch.randint(1, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(5))
    tokens[0, torch.tensor(LENGTHS).cumsum(0) - 1] = EOD
    ids = document_ids(tokens[0, :seq], EOD).view(1, seq)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).view(1, seq)
    return tokens, ids, positions, (tokens[:, :seq] != EOD).float()


def _packed_run(chunk, documents: bool = True):
    """(tracked MTP loss, eh_proj gradient) of one forward + backward of the packed sample's LM loss."""
    from model.mtp import take_mtp_loss

    tokens, ids, positions, mask = _sample()
    take_mtp_loss()
    out = chunk(tokens[:, :-1], positions, ids if documents else None, labels=tokens[:, 1:], loss_mask=mask)
    (out * mask).sum().backward()
    proj = chunk.mtp.layers[0].eh_proj.weight
    grad, proj.grad = proj.grad, None
    chunk.zero_grad()
    return take_mtp_loss(), grad


@pytest.fixture(scope="module")
def chunk(megatron_single_process):
    """tiny_deepseek (MLA, a MoE MTP layer, no balancing loss) with one MTP module, built for documents."""
    from model.gpt import ModelBuild, build_model_chunks

    model = dataclasses.replace(_tiny_deepseek(), mtp_num_layers=1, mtp_loss_scaling_factor=SCALE)
    (chunk,) = build_model_chunks(model, ModelBuild(document_positions=True), vocab_size=VOCAB)
    return chunk


def _per_document_formula(chunk):
    """(the token-mean MTP loss, eh_proj's gradient of SCALE × its token sum) by the formula on each
    document alone (the main model's output h from the document alone too)."""
    tokens, _, _, mask = _sample()
    proj = chunk.mtp.layers[0].eh_proj.weight
    hidden = []
    chunk.decoder.register_forward_hook(lambda m, i, out: hidden.append(out.detach()))
    total, count, start = 0.0, 0.0, 0
    for n in LENGTHS:
        doc = tokens[:, start : start + n + 1]  # its inputs and labels (the last: the next document's first)
        with torch.no_grad():
            chunk(doc[:, :n], torch.arange(n).view(1, n), None)
        losses = _formula(chunk, hidden.pop(), doc)  # [1, n-1]: positions 0..n-2 of the document
        counted = mask[:, start + 1 : start + n]  # the LM loss at i+1 counts
        (SCALE * (losses * counted).sum()).backward(inputs=[proj])
        total, count, start = total + float((losses * counted).sum()), count + float(counted.sum()), start + n
    chunk.decoder._forward_hooks.clear()
    grad, proj.grad = proj.grad, None
    return total / count, grad


def test_mtp_on_documents_equals_the_formula_on_each_document(chunk):
    logged, grad = _packed_run(chunk)
    expected, expected_grad = _per_document_formula(chunk)
    assert logged == pytest.approx(expected, rel=1e-5, abs=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert grad.abs().max() > 1e-3


def test_mtp_rolled_across_documents_is_far_from_the_formula(chunk):
    """Negative control: megatron-core's plain roll (the GPTModel class the model derives from, whose
    MTP input and target at a document's last tokens come from the next document)."""
    expected, _ = _per_document_formula(chunk)
    documents_class = type(chunk)
    chunk.__class__ = documents_class.__mro__[1]
    try:
        logged, _ = _packed_run(chunk)
    finally:
        chunk.__class__ = documents_class
    assert abs(logged - expected) > 1e-3 * expected, (logged, expected)
