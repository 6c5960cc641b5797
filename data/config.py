"""The `data` recipe section: which indexed datasets, how they are split, blended and read."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import RecipeError
from common.schema import NonNegativeInt


@dataclass
class DataConfig:
    """Indexed datasets (PREFIX.bin / PREFIX.idx) blended, split by documents, packed into samples."""

    path: str | None = None  # one indexed dataset prefix; shorthand for blend: [[1.0, path]]
    # Several datasets: [[weight, prefix], ...], each weight > 0 (normalized to sum 1); a sample is
    # drawn from each in proportion to its weight. Only one of path / blend.
    blend: list[tuple[float, str]] | None = None
    # Shares of each dataset's documents for train,valid,test (Megatron-LM's --split), e.g. "98,1,1".
    split: str = "100,0,0"
    # Separate validation data instead of a valid share of data.split: a prefix, or a weighted blend.
    valid_path: str | None = None
    valid_blend: list[tuple[float, str]] | None = None
    # Where megatron-core caches its document/sample/shuffle indices; None = <logging.dir>/data_cache.
    cache_dir: str | None = None
    eod_mask_loss: bool = False  # no loss on the prediction made at each EOD token (Megatron-LM's)
    # Documents inside a packed sample (each ends at its EOD, as megatron-core's GPTDataset marks
    # them): RoPE positions restart at 0 at each document (reset_position_ids); each token attends
    # only to the earlier tokens of its own document (reset_attention_mask). Both take effect in
    # every layout (docs/context_parallel.md, "Documents").
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    tokenizer: str = "byte"  # byte (built-in, 257 ids), a local tokenizer.json (or its folder), or a hub name
    # Processes that build the next training step's micro-batches while the model computes this one
    # (a torch DataLoader, pinned memory on GPUs; validation batches are built in the training
    # process); 0 = build them in the training process. The samples are the same either way.
    num_workers: NonNegativeInt = 0

    def check(self, eval_interval: int, test_at_end: bool) -> None:
        """The section's own consistency, and that validation (every `eval_interval` steps) and the
        test at the end (`test_at_end`) have data."""
        d = self
        for single, many in (("path", "blend"), ("valid_path", "valid_blend")):
            if getattr(d, single) is not None and getattr(d, many) is not None:
                raise RecipeError(f"data.{single} and data.{many} are both set: use one (set the other to null)")
        _check_blend("data.blend", d.blend)
        _check_blend("data.valid_blend", d.valid_blend)
        shares = parse_split(d.split)
        separate_valid = d.valid_path is not None or d.valid_blend is not None
        if separate_valid and shares[1] > 0:
            raise RecipeError(
                f"data.split '{d.split}' gives a valid share and data.valid_path / valid_blend "
                "is set too: use one source of validation data"
            )
        if eval_interval and not separate_valid and shares[1] == 0:
            raise RecipeError(
                f"train.eval_interval = {eval_interval} needs validation data: give data.split a "
                "valid share (e.g. '98,1,1') or set data.valid_path"
            )
        if test_at_end and shares[2] == 0:
            raise RecipeError(
                f"train.test_at_end = true needs a test share in data.split (its third number, "
                f"e.g. '98,1,1'), got '{d.split}'"
            )


def check_documents(data: DataConfig, transformer_impl: str, mtp: int = 0) -> None:
    """Document masking runs in our local attention (every layout); transformer-engine's attention
    would take documents only in its THD packed format, which the model does not build. Multi-token
    prediction stops at document ends for one MTP module (model/mtp.py:with_documents_in_mtp): a
    second one would be rolled across them by megatron-core."""
    if data.reset_attention_mask and mtp > 1:
        raise RecipeError(
            f"data.reset_attention_mask = true is built for model.mtp_num_layers = 1 (got {mtp}): megatron-core "
            "would roll the loss mask of a second MTP module across document ends"
        )
    if data.reset_attention_mask and transformer_impl != "local":
        raise RecipeError(
            "data.reset_attention_mask = true needs model.transformer_impl = local (transformer-engine's "
            "attention takes documents only in its THD format, which is not wired here)"
        )


def parse_split(text: str) -> list[float]:
    """'98,1,1' -> [98.0, 1.0, 1.0] (missing shares are 0); RecipeError naming data.split otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or not all(math.isfinite(x) and x >= 0 for x in shares) or not shares[0] > 0:
        raise RecipeError(
            f"data.split must be 1 to 3 comma-separated non-negative shares "
            f"(train,valid,test) with a positive train share, e.g. '98,1,1', got '{text}'"
        )
    return shares + [0.0] * (3 - len(shares))


def _check_blend(key: str, blend: list[tuple[float, str]] | None) -> None:
    if blend is None:
        return
    if not blend:
        raise RecipeError(f"{key} is an empty list: give [[weight, prefix], ...] or null")
    for i, (weight, prefix) in enumerate(blend):
        if not (math.isfinite(weight) and weight > 0):
            raise RecipeError(f"{key}[{i}] ('{prefix}'): weight must be positive, got {weight}")
        if not prefix:
            raise RecipeError(f"{key}[{i}]: the dataset prefix is empty")
