"""optimizer.name = muon against outside implementations: a Hugging Face Llama (tests/e2e/
test_outside_reference.py's, imported with tools/convert_hf.py) trained by pretrain_gpt.py gives,
step for step, the losses and gradient norms of transformers' forward with torch.optim.Muon on its
q, k, v, o, gate, up and down projections and torch.optim.AdamW on the embedding, the output layer
and the norms: our fused QKV and [gate; up] matrices must be orthogonalized as those separate ones.

torch.optim.Muon runs Newton-Schulz in bf16 only; the recipe's default is fp32 (the same curve at
every layout). The reference lifts torch's one bf16 cast to fp32 for its step; everything else
(momentum, Nesterov, normalization, the polynomial, the lr adjustment, weight decay) is torch's.
tests/unit/test_muon.py holds the bf16 path to torch's bit for bit on the same tensors.

Measured (2026-12-07): at most 4.7e-8 (loss) and 2.0e-7 (grad norm) apart. Negative controls:
optimizer.ns_steps=0 is 1.2e-3 off in loss at step 2 (the test below); by hand, split_qkv=false (QKV
orthogonalized whole) 3.3e-4 at step 2, ns_dtype=bf16 against this fp32 reference 1.2e-5 (loss) and
3.6e-4 (grad norm)."""

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.test_outside_reference import (  # noqa: F401 (the module's fixture)
    BETAS,
    CLIP,
    EPS,
    GLOBAL_BATCH,
    LR,
    MICRO_BATCH,
    REL,
    SEQ,
    STEPS,
    VOCAB,
    WEIGHT_DECAY,
    _lr,
    _ours,
    imported,
)
from tests.helpers.runs import assert_close_curves

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

MUON = ("optimizer.name=muon", "optimizer.adjust_lr=match_rms_adamw")


def _reference(hf_dir, corpus: str, cache, monkeypatch) -> list[dict]:
    from data.dataset import build_samples
    from data.loader import BatchPlan

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().train()
    named = dict(model.named_parameters())
    hidden = [p for n, p in named.items() if p.ndim == 2 and ".layers." in n]
    outer = [p for n, p in named.items() if p.ndim == 2 and ".layers." not in n]  # embedding, lm_head
    norms = [p for p in named.values() if p.ndim == 1]
    muon = torch.optim.Muon(hidden, lr=LR, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(
        [{"params": outer, "weight_decay": WEIGHT_DECAY}, {"params": norms, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    samples = build_samples([(1.0, corpus)], [], "100,0,0", SEQ, 1234, 256, False, str(cache), 257)["train"]
    plan = BatchPlan(GLOBAL_BATCH, MICRO_BATCH)
    curve = []
    for step in range(STEPS):
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = _lr(step + 1)
        model.zero_grad()
        batches = plan.step_batches(samples, step * GLOBAL_BATCH, torch.device("cpu"))
        tokens = sum(float(b["loss_mask"].sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            logits = model(input_ids=batch["tokens"]).logits.float()
            losses = F.cross_entropy(logits.view(-1, VOCAB), batch["labels"].view(-1), reduction="none")
            summed = (losses * batch["loss_mask"].view(-1)).sum()
            (summed / tokens).backward()
            loss_sum += float(summed.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "bfloat16", torch.Tensor.float)  # torch's Newton-Schulz in fp32
            muon.step()
        adamw.step()
        curve.append({"step": step + 1, "loss": loss_sum / tokens, "grad_norm": grad_norm, "lr": _lr(step + 1)})
    return curve


@pytest.mark.slow
# Llama only: the reference is LlamaForCausalLM with torch's Muon on its 2-D layer weights (the other
# families' fused experts and routers would need their own split; their layouts are covered by
# tests/e2e/test_muon_layouts.py against our one-process curve).
@pytest.mark.parametrize("imported", ["llama"], indirect=True)
def test_one_process_trains_like_torch_muon_and_adamw(imported, synthetic_corpus, tmp_path, monkeypatch):  # noqa: F811
    reference = _reference(imported[0], synthetic_corpus, tmp_path / "cache", monkeypatch)
    ours = _ours(1, imported, synthetic_corpus, tmp_path / "ours", *MUON)
    assert_close_curves(ours, reference, rel=REL, keys=("loss", "grad_norm", "lr"))
    # Negative control: the update not orthogonalized (only normalized) is another optimizer.
    plain = _ours(1, imported, synthetic_corpus, tmp_path / "plain", *MUON, "optimizer.ns_steps=0")
    with pytest.raises(AssertionError, match="rel"):
        assert_close_curves(plain, reference, rel=REL, keys=("loss",))
