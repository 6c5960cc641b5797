"""`--dry-run` planning: which layers each pipeline stage holds, without building anything."""

from planning.dry_run import placement
from pretrain.recipe import load_recipe


def _layers(overrides, world):
    stages = placement(load_recipe("tiny_gpt", overrides), world).stages
    return [s.layers for s in stages]


def test_even_pipeline():
    assert _layers(["parallel.pipeline=2"], 2) == [((0, 2),), ((2, 4),)]


def test_interleaved_pipeline_holds_strided_chunks():
    # 8 layers, 2 stages × 2 chunks of 2 layers: stage 0 holds blocks 0 and 2.
    assert _layers(["model.num_layers=8", "parallel.pipeline=2", "parallel.virtual_pipeline=2"], 2) == [
        ((0, 2), (4, 6)),
        ((2, 4), (6, 8)),
    ]


def test_uneven_pipeline():
    overrides = [
        "model.num_layers=8",
        "parallel.pipeline=4",
        "parallel.first_stage_layers=1",
        "parallel.last_stage_layers=3",
        "train.global_batch_size=8",
    ]
    assert _layers(overrides, 4) == [((0, 1),), ((1, 3),), ((3, 5),), ((5, 8),)]
