"""upstream/process.py quiet_dependency_warnings: the notices megatron-core's own code causes are off
wherever torch attributes them (on a CPU, to the device layer's frame, not megatron's)."""

import warnings

import torch


def _non_leaf_grad_read() -> list[str]:
    """What the distributed optimizer's zero_grad does to its fp32 shards: read `.grad` of a view."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from upstream.process import quiet_dependency_warnings

        quiet_dependency_warnings()
        weight = torch.zeros(4, requires_grad=True)
        assert weight.view(-1)[1:3].grad is None
    return [str(w.message) for w in caught]


def test_the_distributed_optimizers_non_leaf_grad_notice_is_off():
    assert _non_leaf_grad_read() == []


def test_the_notice_is_there_without_the_filter(monkeypatch):
    """Negative control: the same read warns when the filters are not installed."""
    import upstream.process

    monkeypatch.setattr(upstream.process, "quiet_dependency_warnings", lambda: None)
    assert any("not a leaf Tensor" in m for m in _non_leaf_grad_read())
