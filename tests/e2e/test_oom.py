"""An out-of-memory error in a step (debug.oom_*: torch.OutOfMemoryError as the CUDA allocator words
it) is one block from the rank it happened on, exit code 4, naming the cheapest change that fits."""

import re

from common.errors import EXIT_OUT_OF_MEMORY
from tests.helpers.runs import run_pretrain, tiny_overrides


def test_out_of_memory_is_one_block_with_the_cheapest_change(synthetic_corpus, tmp_path):
    """tiny_gpt's model predicts a 10.4 MiB peak; the error says the device holds 9 MiB."""
    proc = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus,
            tmp_path,
            "train.steps=3",
            "debug.oom_at_step=2",
            "debug.oom_phase=optimizer",
            "debug.oom_device_gib=0.0087890625",  # 9 MiB
        ),
        check=False,
    )
    assert proc.returncode == EXIT_OUT_OF_MEMORY == 4, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "error: out of memory on rank 0 at step 2, phase optimizer: CUDA out of memory. Tried to allocate 2.00 GiB. "
        "GPU 0 has a total capacity of 0.00878906 GiB of which 0 bytes is free. (debug.oom_at_step)"
    )
    assert lines[1] == "  at the failure: allocated and reserved bytes are not measured on a CPU"
    assert re.fullmatch(
        r"  the memory model predicts for rank 0 \(pipeline stage 0\): peak 10.4 MiB \+ 0.0 MiB device reserve = "
        r"10.4 MiB \(weights [\d.]+ MiB, grads [\d.]+ MiB, optimizer [\d.]+ MiB, activations [\d.]+ MiB\)",
        lines[2],
    ), lines[2]
    assert lines[3:] == [
        "  cheapest change that fits in 9.0 MiB: model.recompute_granularity=full model.recompute_method=block "
        "model.recompute_num_layers=1 (needs 9.0 MiB, +22 % forward compute for recompute)"
    ]
