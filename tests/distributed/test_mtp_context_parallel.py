"""Multi-token prediction under context parallelism, on 2 gloo processes: tiny_deepseek (MLA, MoE) with
one MTP module, on packed samples of several documents (data.reset_attention_mask and
reset_position_ids) and a loss mask whose zeros fall unevenly on the two context-parallel ranks, at
CP2 through the ring (p2p) and Ulysses (a2a) against the same model on one rank's whole sample: the
MTP loss megatron-core tracks (averaged over the context-parallel ranks, as pretrain/step.py does),
the LM loss sum, the MTP projection's gradient (only MTP's loss reaches it, through the MTP layer's
attention inside documents) and the first layer's key/value down-projection gradient (the main
model's attention inside documents, MLA's values narrower) agree within 1e-5.

The site test of upstream/fixes.py `gpt_model.roll_tensor`: with the fix reverted each rank divides
its MTP token sum by its own token count and the tracked loss is the mean of the two ranks' means,
here 1.6e-4 off, 16 times the bound (a random model's token losses are all near ln 257; the LM
loss and the gradient stay right: they take per-token losses). The document stops at CP
(model/mtp.py:document_starts on each rank's load-balanced chunks) are in the same comparison; their
negative control, a model that rolls across document ends, is tests/unit/test_mtp_documents.py's."""

import pytest
import torch

from tests.helpers.fixes import unfixed
from tests.helpers.spawn import run_distributed

FIX = "gpt_model.roll_tensor"
SEQ, BATCH = 32, 2
LENGTHS = [[5, 9, 3, 15], [20, 12]]  # documents of each sample
TOL = dict(rtol=1e-5, atol=1e-6)


def _batch() -> dict:
    from data.dataset import document_ids

    eod = 0
    tokens = torch.randint(1, 257, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    for i, lengths in enumerate(LENGTHS):
        ends = torch.tensor(lengths).cumsum(0) - 1
        tokens[i, ends] = eod
    inputs = tokens[:, :SEQ]
    ids = torch.stack([document_ids(row, eod) for row in inputs])
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in LENGTHS])
    loss_mask = (inputs != eod).float()  # data.eod_mask_loss
    loss_mask[:, 20:] = 0  # most of rank 0's tokens at CP2 (its chunks: positions 0..7, 24..31)
    return {
        "tokens": inputs,
        "labels": tokens[:, 1:],
        "position_ids": positions,
        "loss_mask": loss_mask,
        "document_ids": ids,
    }


def _mtp_figures(rank: int, world: int) -> dict:
    """{layout: [[tracked MTP loss, LM loss sum], eh_proj gradient, layer 1's linear_kv_down_proj
    gradient]} for one rank's whole sample (the
    same on both ranks), CP2 p2p and a2a fixed, and CP2 p2p with the fix reverted."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from data.dataset import slice_for_context_parallel
    from model.gpt import ModelBuild, build_model
    from model.mtp import take_mtp_loss
    from parallel.layout import Layout, init_model_parallel
    from pretrain.recipe import load_recipe
    from upstream import cpu, fixes

    cpu.enable(torch.device("cpu"))
    overrides = ["model.num_layers=2", "model.mtp_num_layers=1", "model.moe.load_balancing=none"]
    model = load_recipe("tiny_deepseek", overrides).model

    def figures(layout: Layout) -> list:
        _, groups = init_model_parallel(layout)
        model_parallel_cuda_manual_seed(1234)
        build = ModelBuild(layout=layout, document_positions=True)
        (chunk,) = build_model(model, build, 384, torch.device("cpu"), groups)
        batch = slice_for_context_parallel(_batch(), groups.cp.rank(), groups.cp.size())
        take_mtp_loss()
        out = chunk(
            batch["tokens"],
            batch["position_ids"],
            batch["document_ids"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        lm = (out * batch["loss_mask"]).sum()
        lm.backward()
        grads = [
            chunk.mtp.layers[0].eh_proj.weight.grad,
            chunk.decoder.layers[0].self_attention.linear_kv_down_proj.weight.grad,
        ]
        result = torch.stack([torch.tensor(take_mtp_loss()) / groups.cp.size(), lm.detach()])
        for t in (result, *grads):
            torch.distributed.all_reduce(t, group=groups.cp)
        ps.destroy_model_parallel()
        return [result, *grads]

    cp2 = Layout(world_size=world, context=2)
    result = {
        "one": figures(Layout(world_size=world)),
        "p2p": figures(cp2),
        "a2a": figures(Layout(world_size=world, context=2, context_comm="a2a")),
    }
    assert fixes.FIXES.get(FIX).applied  # the figures above ran with the fix
    with unfixed(FIX):
        result["unfixed"] = figures(cp2)
    return result


@pytest.mark.slow
def test_mtp_at_context_parallel_2_equals_one_rank_and_needs_the_token_count_fix():
    figures = run_distributed(_mtp_figures, 2)[0]
    (mtp, lm), *grads = figures["one"]
    assert mtp > 1.0 and all(g.abs().max() > 1e-3 for g in grads)
    for layout in ("p2p", "a2a"):
        for got, want in zip(figures[layout], figures["one"]):
            torch.testing.assert_close(got, want, **TOL)
    unfixed = figures["unfixed"][0]
    torch.testing.assert_close(unfixed[1], lm, **TOL)  # the LM loss, and the gradients, never needed it
    for got, want in zip(figures["unfixed"][1:], grads):
        torch.testing.assert_close(got, want, **TOL)
    assert abs(float(unfixed[0] - mtp)) > 10 * 1e-5 * float(mtp), (float(unfixed[0]), float(mtp))
