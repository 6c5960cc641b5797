"""The fault-injection keys of the hang and out-of-memory reports are refused in one line where they
cannot act."""

import pytest

from common.errors import RecipeError
from pretrain.recipe import load_recipe, validate_for_world


def test_hang_injection_needs_the_watchdog():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny_gpt", ["debug.hang_at_step=3"])
    assert str(e.value) == (
        "debug.hang_at_step needs train.watchdog_timeout_s > 0: the watchdog's record of the collectives is "
        "where a rank skips one, and what reports the hang"
    )


@pytest.mark.parametrize("key", ["hang", "oom"])
def test_injected_rank_must_be_in_the_world(key):
    recipe = load_recipe("tiny_gpt", [f"debug.{key}_at_step=3", f"debug.{key}_rank=4", "train.watchdog_timeout_s=5"])
    with pytest.raises(RecipeError) as e:
        validate_for_world(recipe, 4)
    assert str(e.value) == f"debug.{key}_rank = 4 is not a rank of a world of 4"
