"""What the recipe tests share: each test in its own folder, recipe files written there, the one
error line a recipe gives."""

from __future__ import annotations

import pathlib
import textwrap
from collections.abc import Sequence

import pytest

from common.errors import RecipeError
from pretrain.recipe import load_recipe


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run every test from tmp_path, so files written there display as bare names in messages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def error_of(name: str, overrides: Sequence[str] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(name, overrides)
    return str(info.value)
