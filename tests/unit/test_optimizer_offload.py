"""optimizer.cpu_offload: refused in one line where megatron-core's host optimizer cannot run; the
memory model moves Adam's moments to the host and counts the host's bytes apart; the planner adds
the copies and the host step."""

import pytest

from common.errors import RecipeError
from planning.gpus import GPUS
from planning.memory import estimate, setup_for
from planning.offload import HOST_ADAM_BYTES, HOST_ADAM_GBS, host_state, offloaded_elements
from planning.report import memory_json
from planning.step_time import step_time
from pretrain.recipe import load_recipe

OFFLOAD = "optimizer.cpu_offload=true"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer.offload_fraction=0.5"],
            "optimizer.offload_fraction = 0.5 is only read with optimizer.cpu_offload = true",
        ),
        ([OFFLOAD, "optimizer.offload_fraction=1.5"], "optimizer.offload_fraction must be in (0, 1], got 1.5"),
        ([OFFLOAD, "optimizer.name=muon"], "optimizer.cpu_offload = true with optimizer.name = muon"),
        ([OFFLOAD, "parallel.fsdp=zero3"], "optimizer.cpu_offload = true is not supported with parallel.fsdp = zero3"),
        (
            [OFFLOAD, "train.precision=bf16"],
            "is not supported with train.precision = bf16 without parallel.distributed_optimizer",
        ),
        (
            [OFFLOAD, "parallel.distributed_optimizer=true", "train.precision=fp16"],
            "is not supported with parallel.distributed_optimizer with train.precision = fp16 (not verified)",
        ),
    ],
)
def test_unsupported_offload_is_refused_in_one_line(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny_gpt", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_moments_move_to_the_host_and_the_step_pays_the_copies_and_the_host_adam():
    """llama_1b, bf16 with the distributed optimizer on 8 ranks, all of the state offloaded: the
    device loses Adam's two fp32 moments of its shard (8 bytes an element), the host holds 16 (weight
    and gradient copies, the moments); the step adds 8 bytes an element over PCIe and the host AdamW."""
    base = ["train.precision=bf16", "parallel.distributed_optimizer=true"]
    device = load_recipe("llama_1b", base)
    host = load_recipe("llama_1b", [*base, OFFLOAD])
    setup = setup_for(host, 8)
    elements = offloaded_elements(setup, 0)
    assert elements == offloaded_elements(
        setup_for(load_recipe("llama_1b", [*base, OFFLOAD, "optimizer.offload_fraction=1"]), 8), 0
    )
    assert offloaded_elements(setup_for(device, 8), 0) == 0
    (a,) = estimate(device, 8).stages
    (b,) = estimate(host, 8).stages
    assert a.optimizer - b.optimizer == pytest.approx(8 * elements, rel=1e-6)
    assert host_state(setup, 0) == 16 * elements
    assert memory_json(estimate(host, 8), setup, None)["host_gib"] == pytest.approx(16 * elements / 2**30, abs=1e-3)
    h100 = GPUS["h100"]
    terms = {t.name: t.exposed for t in step_time(setup, h100).terms}
    expected = elements * 8 / (h100.host_link_gbs * 1e9) + elements * HOST_ADAM_BYTES / (HOST_ADAM_GBS * 1e9)
    assert terms["optimizer_offload"] == pytest.approx(expected)
    assert {t.name: t.exposed for t in step_time(setup_for(device, 8), h100).terms}["optimizer_offload"] == 0.0
