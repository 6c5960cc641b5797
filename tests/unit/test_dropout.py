"""Each dropout kind, on its own, changes a training forward of tiny_gpt and nothing in evaluation:
hidden dropout (megatron-core's bias-dropout-add, torch.nn.functional.dropout) and attention
dropout (SDPAttention's dropout_p). The last two tests switch each one off as a bug would and show
the check above failing, so neither can be lost silently again (with F.dropout made the identity,
every other test of the suite still passed)."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from model.gpt import ModelBuild, build_model_chunks
from pretrain.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("megatron_single_process")

VOCAB = 257
KINDS = {"hidden": {"hidden_dropout": 0.2}, "attention": {"attention_dropout": 0.2}}


def _losses(train: bool = True, **dropout: float) -> torch.Tensor:
    """Per-token losses of one batch through tiny_gpt (its weights and dropout draws fixed by seeds)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model = dataclasses.replace(
        load_recipe("tiny_gpt").model, hidden_dropout=0.0, attention_dropout=0.0, num_layers=2, seq_length=32
    )
    torch.manual_seed(7)  # the weights
    model_parallel_cuda_manual_seed(7)
    (chunk,) = build_model_chunks(dataclasses.replace(model, **dropout), ModelBuild(init_seed=7), VOCAB)
    torch.manual_seed(1)  # the dropout masks
    model_parallel_cuda_manual_seed(1)
    chunk.train(train)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return chunk(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:])


@functools.cache
def _without_dropout(train: bool) -> torch.Tensor:
    return _losses(train)


def _changes_training_only(kind: str) -> bool:
    trained, evaluated = _losses(**KINDS[kind]), _losses(False, **KINDS[kind])
    return not torch.equal(trained, _without_dropout(True)) and torch.equal(evaluated, _without_dropout(False))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_dropout_kind_changes_a_training_forward(kind):
    assert _changes_training_only(kind)


def test_hidden_dropout_switched_off_is_seen(monkeypatch):
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    assert not _changes_training_only("hidden")
    assert _changes_training_only("attention")


def test_attention_dropout_switched_off_is_seen(monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, dropout_p=0.0, **k: sdpa(*a, **k))
    assert not _changes_training_only("attention")
    assert _changes_training_only("hidden")
