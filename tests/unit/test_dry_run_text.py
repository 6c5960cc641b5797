"""The dry run's text for people: durations under a second in ms or µs (the JSON keeps seconds at full
precision), one-layer pipeline stages as "layer N"."""

import json

from planning.dry_run import dry_run, layers_text, step_time_lines
from planning.report import duration, significant
from pretrain.recipe import load_recipe


def test_duration_keeps_three_significant_digits_below_a_second():
    assert [duration(s) for s in (12.3456, 1.0, 0.98765, 0.0012345, 0.000115, 4.2e-7, 0.0)] == [
        "12.346 s",
        "1.000 s",
        "988 ms",
        "1.23 ms",
        "115 µs",
        "0.420 µs",
        "0.000 s",
    ]
    assert [significant(x) for x in (1.7349, 44.04, 0.000123456, 1234.5)] == ["1.73", "44.0", "0.000123", "1234"]


def test_step_time_lines_print_small_steps_in_microseconds():
    t = {
        "gpu": "h100",
        "seconds": 0.000115,
        "tokens_per_s_per_gpu": 2230484.4,
        "tflops_per_gpu": 3.2,
        "flops_convention": "model FLOPs",
        "terms": {"compute": {"seconds": 5.96e-05, "exposed": 5.96e-05}, "bubble": {"seconds": 0.0, "exposed": 0.0}},
    }
    assert step_time_lines(t) == [
        "step time on h100: 115 µs, 2,230,484 tokens/s/GPU, 3 TFLOP/s/GPU (model FLOPs)",
        "  compute                 59.6 µs,    59.6 µs exposed",
    ]


def test_one_layer_stages_say_layer():
    assert layers_text(((0, 1),)) == "layer 0"
    assert layers_text(((0, 4),)) == "layers 0-3"
    assert layers_text(((1, 2), (3, 4))) == "layers 1, 3"
    assert layers_text(((0, 2), (4, 6))) == "layers 0-1, 4-5"


def test_tiny_dry_run_on_a_gpu():
    """tiny_gpt at pipeline 4: a layer per stage, a step of microseconds; --json keeps full precision."""
    recipe = load_recipe("tiny_gpt", ["parallel.pipeline=4", "train.global_batch_size=8"])
    lines = dry_run(recipe, 4, None, False, "h100").splitlines()
    stages = [line.split(";")[0] for line in lines if line.startswith("  pipeline stage")]
    assert stages == [f"  pipeline stage {p}: layer {p}" for p in range(4)]
    step = json.loads(dry_run(recipe, 4, None, True, "h100"))["step_time"]["seconds"]
    assert 1e-6 < step < 1e-3 and step != round(step, 6)  # seconds, unrounded
    assert f"step time on h100: {significant(step * 1e6)} µs, " in "\n".join(lines)
