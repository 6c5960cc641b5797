"""common/files.py:set_aside, and the files a restarted run writes again (a profile trace) kept
under a new name instead of overwritten."""

import pathlib

import torch

from common.files import set_aside


def test_set_aside_takes_the_first_free_name(tmp_path):
    for k in (1, 2):
        (tmp_path / "recipe.yaml").write_text(f"run {k}\n")
        assert set_aside(tmp_path / "recipe.yaml") == tmp_path / f"recipe.replaced-{k}.yaml"
    assert (tmp_path / "recipe.replaced-1.yaml").read_text() == "run 1\n"
    assert (tmp_path / "recipe.replaced-2.yaml").read_text() == "run 2\n"
    (tmp_path / "iter_0000006").mkdir()
    assert set_aside(tmp_path / "iter_0000006") == tmp_path / "iter_0000006.replaced-1"
    assert not (tmp_path / "iter_0000006").exists()


def _profile_step_one(log_dir: pathlib.Path) -> None:
    from pretrain.profiling import ProfileConfig, Profiler

    profiler = Profiler(ProfileConfig(start_step=1), 0, log_dir, torch.device("cpu"))
    profiler.before_step(1)
    torch.ones(4).sum()
    profiler.after_step(1)


def test_profiling_the_same_step_again_keeps_the_earlier_trace(tmp_path, capsys):
    _profile_step_one(tmp_path)
    first = (tmp_path / "profile" / "trace_rank0.json").read_text()
    _profile_step_one(tmp_path)
    kept = tmp_path / "profile" / "trace_rank0.replaced-1.json"
    assert kept.read_text() == first
    assert (
        f"{tmp_path / 'profile' / 'trace_rank0.json'} exists: the earlier one is kept as {kept}"
        in capsys.readouterr().out
    )
