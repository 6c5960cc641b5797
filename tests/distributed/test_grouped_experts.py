"""model/grouped_experts.py on 4 gloo ranks: at every expert-parallel / expert-tensor-parallel /
expert-data-parallel layout, each rank's grouped experts equal its SequentialMLP experts bit for
bit (same initialization, outputs and every gradient) and save SequentialMLP's sharded tensors."""

import pytest
import torch

from tests.helpers.spawn import run_distributed

# parallel sizes on 4 ranks -> (expert, expert tensor, expert data) sizes they give
LAYOUTS = {
    "ep2-edp2": dict(expert=2),
    "ep4": dict(expert=4),
    "etp2-edp2": dict(tensor=2, sequence_parallel=True),
    "ep2-etp2": dict(expert=2, tensor=2, sequence_parallel=True),
    "ep2-etp1-tp2-edp2": dict(expert=2, tensor=2, sequence_parallel=True, expert_tensor=1),
}


def _compare(rank: int, layout) -> dict:
    from model.gpt import ModelBuild, build_model_chunks
    from tests.unit.test_grouped_experts import _model, _run, _sharded_entries

    chunks = {}
    for grouped in (False, True):
        torch.manual_seed(0)
        (chunks[grouped],) = build_model_chunks(_model(grouped_gemm=grouped), ModelBuild(layout=layout), 256)
    sequential, grouped = (chunks[g].decoder.layers[0].mlp.experts for g in (False, True))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens, some experts without any
    counts = torch.randint(0, 6, (grouped.num_local_experts,), generator=g)
    counts[0] = max(int(counts[0]), 1)
    hidden = torch.randn(int(counts.sum()), 64, generator=g)
    probs, grad = torch.rand(hidden.shape[0], generator=g), torch.randn(hidden.shape[0], 64, generator=g)
    want, got = _run(sequential, counts, hidden, probs, grad), _run(grouped, counts, hidden, probs, grad)
    flat = lambda r: [r["out"], r["hidden"], r["probs"], *r["fc1"], *r["fc2"]]
    return dict(
        shapes=(tuple(grouped.weight1.shape), tuple(grouped.weight2.shape)),
        equal=all(torch.equal(a, b) for a, b in zip(flat(got), flat(want))),
        sharded=_sharded_entries(chunks[True]) == _sharded_entries(chunks[False]),
        # the control: one token handed from the first local expert to the second changes the output
        control=not torch.equal(
            _run(grouped, counts + torch.tensor([-1, 1] + [0] * (len(counts) - 2)), hidden, probs, grad)["out"],
            want["out"],
        ),
    )


def _rank(rank: int, world: int) -> dict:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from parallel.layout import Layout, init_model_parallel
    from upstream import cpu

    out = {}
    with cpu.applied():
        for name, sizes in LAYOUTS.items():
            layout = Layout(world_size=world, **sizes)
            init_model_parallel(layout)
            model_parallel_cuda_manual_seed(1234)
            out[name] = _compare(rank, layout)
    return out


@pytest.mark.slow
def test_grouped_equal_sequential_at_every_expert_layout():
    results = run_distributed(_rank, 4)
    expected_shapes = {
        "ep2-edp2": ((4, 128, 64), (4, 64, 64)),
        "ep4": ((2, 128, 64), (2, 64, 64)),
        "etp2-edp2": ((8, 64, 64), (8, 64, 32)),
        "ep2-etp2": ((4, 64, 64), (4, 64, 32)),
        "ep2-etp1-tp2-edp2": ((4, 128, 64), (4, 64, 64)),
    }
    for rank, by_layout in enumerate(results):
        for name, r in by_layout.items():
            assert r["shapes"] == expected_shapes[name], (rank, name)
            assert r["equal"] and r["sharded"] and r["control"], (rank, name, r)
