"""The token-id check of a training step (pretrain/step.py:Stepper.check_token_ids) on 2 gloo ranks:
when only one rank's micro-batch holds an id beyond the vocabulary, both ranks stop at the same
step with the same one-line message, naming the sample; with every id in range neither stops."""

import types

import pytest
import torch

from tests.helpers.spawn import run_distributed

VOCAB = 257


class _Samples:
    """Samples 0..7 of 5 tokens; sample 6 holds id 300 (read by data rank 1)."""

    def __getitem__(self, i: int) -> dict:
        tokens = torch.full((5,), i, dtype=torch.int64)
        if i == 6:
            tokens[2] = 300
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.ones(4),
            "position_ids": torch.arange(4),
        }


def _check_both(rank: int, world: int) -> list[str]:
    return [_check(rank, True), _check(rank, False)]


def _check(rank: int, with_bad: bool) -> str:
    from common.errors import AgreedUserError
    from data.loader import BatchPlan
    from pretrain.step import Stepper

    plan = BatchPlan(8, 2, dp_size=2, dp_rank=rank)
    samples = _Samples() if with_bad else {i: _Samples()[i if i != 6 else 5] for i in range(8)}
    stepper = types.SimpleNamespace(device=torch.device("cpu"), vocab_size=VOCAB, plan=plan)
    batches = [plan.whole_batch(samples, 0, m) for m in range(plan.micro_batches)]
    assert any(int(b["tokens"].max()) >= VOCAB for b in batches) == (with_bad and rank == 1)
    try:
        Stepper.check_token_ids(stepper, batches, samples, 0)
    except AgreedUserError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_one_rank_with_a_bad_id_stops_both_ranks_alike():
    (bad0, good0), (bad1, good1) = run_distributed(_check_both, 2)
    assert good0 == good1 == "no error"
    expected = (
        "sample 6 holds token id 300, outside the model's 257 ids: it was built with another tokenizer "
        "than data.tokenizer; rebuild it with 'python -m data.preprocess' and this tokenizer (or set "
        "data.tokenizer to the one it was built with)"
    )
    assert bad0 == bad1 == expected
