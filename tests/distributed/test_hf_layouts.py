"""Imported Hugging Face models at other layouts, on 2 gloo ranks (one process start for every
family): logits equal transformers' at one multi-rank layout per family, and a checkpoint saved at
any layout (TP, PP, EP, ETP, FSDP, CP) exports bit for bit to the HF tensors it was imported from."""

import json
import pathlib

import pytest
import torch

from tests.helpers.hf_families import VOCAB, hf_model, read_tensors
from tests.helpers.spawn import run_distributed

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
pytestmark = pytest.mark.slow  # one 2-rank start for every family and layout (about 60 s on 2 shared cores)

TOKENS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
LOGITS_ATOL = 1e-5  # as tests/unit/test_hf_families.py: fp32 rounding, where a mapping error is >= 1e-3
# family -> [(layout sizes, run a forward)]: each family's forward layout splits what it adds
# (the llama3 frequencies and the q/k norms across tensor ranks, experts across expert ranks)
LAYOUTS = {
    "llama3.1": [(dict(tensor=2), True), (dict(pipeline=2), False)],
    "qwen3": [(dict(tensor=2, sequence_parallel=True), True), (dict(fsdp="zero3"), False)],
    "mixtral": [(dict(expert=2), True), (dict(tensor=2, sequence_parallel=True), False)],
    "qwen3-moe": [
        (dict(tensor=2, sequence_parallel=True, expert=2, expert_tensor=1), True),
        (dict(tensor=2, sequence_parallel=True, expert_tensor=2), False),
        (dict(pipeline=2), False),
    ],
    # multi-latent attention's latents and RoPE key across tensor ranks, grouped routing across expert
    # ranks; the pipeline split puts the dense layer and the MoE layer on different stages. Negative
    # control, by hand: 1e-6 added to expert rank 1's local expert 1 before the save fails the export
    # at model.layers.1.mlp.experts.5 (each expert gathered to its global index, compared bitwise)
    "deepseek-v3": [
        (dict(tensor=2, sequence_parallel=True, expert=2, expert_tensor=1), True),
        (dict(pipeline=2), False),
    ],
    # YaRN at context parallelism: each rank's rotary and its cos/sin factor at its two chunks'
    # positions (megatron-core's YarnRotaryEmbedding, sliced as the batch). Negative control, by
    # hand (2026-12-07): each rank's embedding at positions 0 to s/2 instead of its chunks' moves
    # the logits by 0.11 (the other families here: at most 3.6e-7).
    "deepseek-v3-yarn": [(dict(context=2), True)],
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, megatron_single_process):
    """family -> (HF dir, imported checkpoint, HF logits), converted in this process."""
    from tools.convert_hf import import_hf

    out = {}
    for name in LAYOUTS:
        root = tmp_path_factory.mktemp(name)
        model = hf_model(name)
        model.save_pretrained(root / "hf")
        with torch.no_grad():
            logits = model(TOKENS).logits
        import_hf(root / "hf", root / "ckpt")
        out[name] = (root / "hf", root / "ckpt", logits)
    return out


def _tag(sizes: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sizes.items())


def _at_layouts(rank: int, world: int, jobs: list, out_root: str) -> dict:
    """For each (family, checkpoint, sizes, forward): build the model at that layout, load the
    checkpoint, maybe run the forward (logits gathered over tensor ranks), save it again."""
    from data.dataset import slice_for_context_parallel
    from model.gpt import ModelBuild, build_model
    from parallel.data_parallel import wrap_data_parallel
    from parallel.layout import Layout, init_model_parallel
    from pretrain.checkpoint import storage as checkpoint
    from pretrain.recipe import model_config_from_dict
    from upstream import cpu

    cpu.enable(torch.device("cpu"))
    results = {}
    for name, ckpt, sizes, forward in jobs:
        path = checkpoint.resolve_load(ckpt, pathlib.Path(ckpt))
        extra = checkpoint.read_extra(path)
        model_cfg = model_config_from_dict(extra["recipe"]["model"], "test")
        layout = Layout(world_size=world, **sizes)
        _, groups = init_model_parallel(layout)
        build = ModelBuild(layout=layout, perform_initialization=False)
        chunks = build_model(model_cfg, build, 1024, torch.device("cpu"), groups)
        if layout.fsdp:
            chunks = wrap_data_parallel(chunks, False, groups, fsdp=layout.fsdp)
        checkpoint.load(path, chunks, None)
        tag = f"{name}-{_tag(sizes)}"
        if forward:
            (chunk,) = chunks
            chunk.eval()
            positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
            batch = slice_for_context_parallel(
                {"tokens": TOKENS, "positions": positions}, groups.cp.rank(), layout.context
            )
            with torch.no_grad():
                logits = chunk(batch["tokens"], batch["positions"], None)  # [b, s / context, padded vocab / tensor]
            logits = torch.cat(_gathered(logits, groups.tp), dim=-1)
            results[tag] = _context_unsliced(_gathered(logits, groups.cp))[..., :VOCAB]
        checkpoint.save(pathlib.Path(out_root) / tag, 0, chunks, None, extra)
    return results


def _gathered(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    shards = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    return shards


def _context_unsliced(pieces: list[torch.Tensor]) -> torch.Tensor:
    """[b, s, ...] from the context ranks' [b, s / context, ...] (rank r: chunks r and 2·context - 1 - r
    of 2·context, data/dataset.py:slice_for_context_parallel)."""
    size = len(pieces)
    chunks: list = [None] * (2 * size)
    for rank, piece in enumerate(pieces):
        chunks[rank], chunks[2 * size - 1 - rank] = piece.chunk(2, dim=1)
    return torch.cat(chunks, dim=1)


@pytest.fixture(scope="module")
def at_layouts(imported, tmp_path_factory):
    """(rank 0's logits by tag, folder of the checkpoints saved at each layout)."""
    out_root = tmp_path_factory.mktemp("layouts")
    jobs = [
        (name, str(imported[name][1]), sizes, forward)
        for name, layouts in LAYOUTS.items()
        for sizes, forward in layouts
    ]
    logits = run_distributed(_at_layouts, 2, jobs, str(out_root))[0]
    return logits, out_root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logits_equal_transformers_at_a_multi_rank_layout(name, imported, at_layouts):
    (sizes, _), *_ = LAYOUTS[name]
    ours, expected = at_layouts[0][f"{name}-{_tag(sizes)}"], imported[name][2]
    assert float(expected.std()) > 0.1
    torch.testing.assert_close(ours, expected, rtol=0, atol=LOGITS_ATOL)


EXPORTS = [(name, sizes) for name, layouts in LAYOUTS.items() for sizes, _ in layouts]


@pytest.mark.parametrize("name, sizes", EXPORTS, ids=[f"{n}-{_tag(s)}" for n, s in EXPORTS])
def test_export_from_any_layout_is_the_imported_tensors_bitwise(name, sizes, imported, at_layouts, tmp_path):
    from tools.convert_hf import export_hf

    export_hf(at_layouts[1] / f"{name}-{_tag(sizes)}", tmp_path / "hf")
    original, exported = read_tensors(imported[name][0]), read_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == json.loads((imported[name][0] / "config.json").read_text())["architectures"]


def _logits_through_the_pipeline(rank: int, world: int, ckpt: str, sizes: dict) -> torch.Tensor | None:
    """The imported checkpoint at `sizes` over `world` ranks, the tokens through megatron-core's
    pipeline schedule (forward only, the last stage's output collected); the logits gathered over
    tensor ranks on the last stage's first tensor rank, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.gpt import ModelBuild, build_model
    from parallel.layout import Layout, init_model_parallel
    from pretrain.checkpoint import storage as checkpoint
    from pretrain.recipe import model_config_from_dict
    from upstream import cpu

    cpu.enable(torch.device("cpu"))
    path = checkpoint.resolve_load(ckpt, pathlib.Path(ckpt))
    model_cfg = model_config_from_dict(checkpoint.read_extra(path)["recipe"]["model"], "test")
    layout = Layout(world_size=world, **sizes)
    _, groups = init_model_parallel(layout)
    chunks = build_model(
        model_cfg, ModelBuild(layout=layout, perform_initialization=False), 1024, torch.device("cpu"), groups
    )
    checkpoint.load(path, chunks, None)
    (chunk,) = chunks
    chunk.eval()
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)

    def forward(iterator, model):
        return model(next(iterator), positions, None), lambda output, non_loss_data=False: output

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward,
            data_iterator=iter([TOKENS]),
            model=chunk,
            num_microbatches=1,
            seq_length=TOKENS.shape[1],
            micro_batch_size=TOKENS.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not collected:
        return None
    logits = collected[0]
    shards = [torch.empty_like(logits) for _ in range(groups.tp.size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=groups.tp)
    return torch.cat(shards, dim=-1)[..., :VOCAB] if groups.tp.rank() == 0 else None


def test_deepseek_logits_equal_transformers_at_tensor_expert_and_pipeline_2(imported):
    """TP2 + SP x EP2 (expert tensor 1) x PP2 on 4 ranks: the dense first layer and the MoE layer on
    different stages, the hidden states sent between them, experts split over expert ranks. Negative
    control (by hand): 1e-3 added to one expert weight on rank 3 (last stage, expert rank 1) moves the
    logits by 8.5e-3."""
    sizes = dict(tensor=2, sequence_parallel=True, expert=2, expert_tensor=1, pipeline=2)
    results = run_distributed(_logits_through_the_pipeline, 4, str(imported["deepseek-v3"][1]), sizes)
    (ours,) = [r for r in results if r is not None]
    torch.testing.assert_close(ours, imported["deepseek-v3"][2], rtol=0, atol=LOGITS_ATOL)
