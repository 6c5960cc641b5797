"""model/fp8/linear.py on 2 gloo ranks: FP8 linears split over tensor (with sequence parallelism) or context
parallel ranks cast with the single-process scales, so each rank's share of every GEMM equals the
single-process FP8 result; with the amax reductions switched off they do not (the control)."""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.spawn import run_distributed

RECIPES = ("tensorwise", "rowwise")
S, B, H, F = 16, 2, 64, 128  # sequence, batch, hidden, inner size of the column -> row pair
# Shares that sum bf16 partial results across ranks (row-parallel output, column-parallel input
# gradient, context-parallel weight gradient) differ from one process by bf16 rounding only:
# measured (2026-11-30) ≤ 3.9e-3 relative (norm); without the amax reductions ≥ 2.9e-2.
PARTIAL_SUM_REL = 1e-2


def _data(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _both_ways(rank_fn, rank: int) -> dict:
    """rank_fn's results with the amax reductions (True) and, as the control, without them (False):
    every amax from this rank's piece alone."""
    from model.fp8 import linear as fp8

    out, groups = {True: rank_fn(rank)}, fp8._Split.groups
    fp8._Split.groups = lambda self, axis: ()
    try:
        out[False] = rank_fn(rank)
    finally:
        fp8._Split.groups = groups
    return out


def _rank(rank: int, world: int) -> dict:
    return {"tp": _both_ways(_tensor_parallel, rank), "cp": _both_ways(_context_parallel, rank)}


def _reference(recipe: str, x, weights, dy) -> dict:
    """Linears applied in turn on one process, through the same FP8 function without any group:
    outputs, the input gradient and each weight's gradient."""
    from model.config import Fp8Config
    from model.fp8.linear import Fp8LinearFunction, _Splits, gemms_for

    gemms = gemms_for(Fp8Config(enabled=True, recipe=recipe))
    x = x.clone().requires_grad_()
    weights = [w.clone().requires_grad_() for w in weights]
    outs, h = [], x
    for w in weights:
        h = Fp8LinearFunction.apply(h, w, None, gemms, _Splits.of(True, None, None))
        outs.append(h)
    h.backward(dy)
    return dict(outs=[o.detach() for o in outs], x_grad=x.grad, wgrads=[w.grad for w in weights])


def _tensor_parallel(rank: int) -> dict:
    """Megatron-core's FP8 column- and row-parallel linears at TP 2 with sequence parallelism."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.config import Fp8Config, ModelConfig
    from model.fp8 import linear as fp8
    from model.gpt import ModelBuild, transformer_config
    from model.precision import Precision
    from parallel.layout import Layout, init_model_parallel
    from upstream import cpu

    layout = Layout(world_size=2, tensor=2, sequence_parallel=True)
    out = {}
    with cpu.applied():
        init_model_parallel(layout)
        model_parallel_cuda_manual_seed(0)
        model = ModelConfig(hidden_size=H, ffn_hidden_size=F)
        config = transformer_config(model, ModelBuild(layout=layout, precision=Precision("bf16")))
        init = torch.nn.init.xavier_normal_
        for recipe in RECIPES:
            gemms = fp8.gemms_for(Fp8Config(enabled=True, recipe=recipe))
            torch.manual_seed(0)  # CPU initialization: every rank draws the full weight, keeps its shard
            col = fp8.Fp8ColumnParallelLinear(H, F, config=config, init_method=init, bias=False, fp8=gemms)
            row = fp8.Fp8RowParallelLinear(
                F,
                H,
                config=config,
                init_method=init,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=False,
                fp8=gemms,
            )
            x = _data(1, S, B, H).chunk(2)[rank].requires_grad_()  # [s/tp, b, h]: the sequence-parallel share
            h, _ = col(x)  # [s, b, f/tp]
            y, _ = row(h)  # [s/tp, b, h]
            y.backward(_data(2, S, B, H).chunk(2)[rank])
            out[recipe] = dict(
                h=h.detach(), y=y.detach(), x_grad=x.grad, col_wgrad=col.weight.grad, row_wgrad=row.weight.grad,
                col_w=col.weight.detach(), row_w=row.weight.detach(),
            )  # fmt: skip
    return out


def _context_parallel(rank: int) -> dict:
    """The FP8 function with each rank holding half of the tokens (context parallelism)."""
    from model.config import Fp8Config
    from model.fp8 import linear as fp8

    out = {}
    for recipe in RECIPES:
        gemms = fp8.gemms_for(Fp8Config(enabled=True, recipe=recipe), cp_group=dist.group.WORLD)
        x = _data(1, S, B, H).chunk(2)[rank].requires_grad_()
        w = (_data(3, F, H) * 0.05).requires_grad_()
        h = fp8.Fp8LinearFunction.apply(x, w, None, gemms, fp8._Splits.of(True, None, dist.group.WORLD))
        h.backward(_data(2, S, B, F).chunk(2)[rank])
        wgrad = w.grad.float()
        dist.all_reduce(wgrad)  # what the data- and context-parallel gradient reduction does
        out[recipe] = dict(h=h.detach(), x_grad=x.grad, wgrad=wgrad)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _tp_mismatches(ranks: list[dict], recipe: str) -> list[str]:
    """Where the TP ranks' shares differ from one process: exactly, for the GEMMs whose contraction
    is not split (column output, both weight gradients); beyond bf16 rounding, for the summed ones."""
    col_w = torch.cat([r[recipe]["col_w"] for r in ranks], 0)
    row_w = torch.cat([r[recipe]["row_w"] for r in ranks], 1)
    ref = _reference(recipe, _data(1, S, B, H), [col_w, row_w], _data(2, S, B, H))
    bad = []
    for rank, got in enumerate(ranks):
        got = got[recipe]
        cols, rows = slice(rank * F // 2, (rank + 1) * F // 2), slice(rank * S // 2, (rank + 1) * S // 2)
        exact = {
            "h": ref["outs"][0][..., cols],
            "col_wgrad": ref["wgrads"][0][cols],
            "row_wgrad": ref["wgrads"][1][:, cols],
        }
        bad += [f"rank {rank} {k}" for k, v in exact.items() if not torch.equal(got[k], v)]
        summed = {"y": ref["outs"][1][rows], "x_grad": ref["x_grad"][rows]}
        bad += [
            f"rank {rank} {k} {_rel(got[k], v):.1e}" for k, v in summed.items() if _rel(got[k], v) > PARTIAL_SUM_REL
        ]
    return bad


def _cp_mismatches(ranks: list[dict], recipe: str) -> list[str]:
    """Each CP rank's output and input gradient rows exactly; the summed weight gradient to bf16 rounding."""
    ref = _reference(recipe, _data(1, S, B, H), [_data(3, F, H) * 0.05], _data(2, S, B, F))
    bad = []
    for rank, got in enumerate(ranks):
        got = got[recipe]
        rows = slice(rank * S // 2, (rank + 1) * S // 2)
        exact = {"h": ref["outs"][0][rows], "x_grad": ref["x_grad"][rows]}
        bad += [f"rank {rank} {k}" for k, v in exact.items() if not torch.equal(got[k], v)]
        if _rel(got["wgrad"], ref["wgrads"][0]) > PARTIAL_SUM_REL:
            bad.append(f"rank {rank} wgrad {_rel(got['wgrad'], ref['wgrads'][0]):.1e}")
    return bad


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_rank, 2)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_tensor_and_sequence_parallel_linears_equal_one_process(recipe, ranks):
    tp = [r["tp"] for r in ranks]
    assert _tp_mismatches([r[True] for r in tp], recipe) == []
    assert _tp_mismatches([r[False] for r in tp], recipe) != []  # the control: no amax reduction


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_context_parallel_linear_equals_one_process(recipe, ranks):
    cp = [r["cp"] for r in ranks]
    assert _cp_mismatches([r[True] for r in cp], recipe) == []
    assert _cp_mismatches([r[False] for r in cp], recipe) != []  # the control: no amax reduction
