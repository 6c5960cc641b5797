"""Checkpoint integrity (pretrain/checkpoint/manifest.py): a damaged newest checkpoint is skipped by
`checkpoint.load=auto` for the newest intact one, which continues the curve exactly; a damaged one
named explicitly, or a folder with none intact, is one line and exit code 2; nothing a run wrote is
destroyed (damaged checkpoints, rewritten metrics, an earlier recipe); a changed model is refused
naming the parameter and the recipe keys.

One tiny run (6 steps, checkpoints at 2, 4, 6) is made once; each case damages a copy of it and
resumes in this process (pretrain/cli.py:main), two steps each."""

import json
import os
import pathlib
import shutil

import pytest

from pretrain.checkpoint import manifest, storage
from tests.helpers.runs import read_metrics

USER_ERROR = 2
STEPS = ["train.steps=6", "checkpoint.interval=2"]


def _overrides(corpus: str, log_dir: pathlib.Path, *extra: str) -> list[str]:
    return [f"data.path={corpus}", f"logging.dir={log_dir}", "logging.wandb.mode=disabled", *STEPS, *extra]


def _main(argv: list[str]) -> int:
    from pretrain.cli import main

    return main(["--recipe", "tiny_gpt", *argv])


@pytest.fixture(autouse=True)
def _process_restored():
    """In-process training sets MASTER_ADDR/MASTER_PORT and turns the CPU layer on: undone after."""
    from upstream import cpu

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    cpu.disable()


@pytest.fixture(scope="module")
def six_steps(synthetic_corpus, tmp_path_factory) -> pathlib.Path:
    """The reference: 6 steps in one process, checkpoints at steps 2, 4 and 6."""
    from upstream import cpu

    log_dir = tmp_path_factory.mktemp("six_steps")
    saved = dict(os.environ)
    try:
        assert _main(_overrides(synthetic_corpus, log_dir)) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
        cpu.disable()
    return log_dir


@pytest.fixture
def run_copy(six_steps, tmp_path) -> pathlib.Path:
    copy = tmp_path / "run"
    shutil.copytree(six_steps, copy)
    return copy


def _flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage(kind: str, ckpt: pathlib.Path) -> str:
    """Damages checkpoint `ckpt` one way; returns what the check must say about it."""
    shard = ckpt / "__0_0.distcp"
    if kind == "truncated":
        size = shard.stat().st_size
        os.truncate(shard, 1000)
        return f"__0_0.distcp is truncated from {size} to 1000 bytes"
    if kind == "missing shard":
        (ckpt / "__0_1.distcp").unlink()
        return "__0_1.distcp is missing"
    if kind == "missing metadata":
        (ckpt / ".metadata").unlink()
        return ".metadata is missing"
    if kind == "garbled metadata":
        (ckpt / "metadata.json").write_text("{bad")
        return "metadata.json is garbled (not a JSON object)"
    assert kind == "checksum"
    saved = json.loads((ckpt / manifest.MANIFEST).read_text())["files"]["__0_0.distcp"]["crc32"]
    _flip_a_byte(shard)
    return f"__0_0.distcp fails its checksum (CRC32 {manifest.crc32_of(shard)}, {saved} when saved)"


KINDS = ["truncated", "missing shard", "missing metadata", "garbled metadata", "checksum"]


@pytest.mark.parametrize("kind", KINDS)
def test_auto_skips_a_damaged_newest_checkpoint_and_continues_the_curve(
    kind, six_steps, run_copy, synthetic_corpus, capsys
):
    """Negative control (by hand): with the check off (`problems` returning []), each kind fails
    deep in megatron-core or torch with a traceback (the checksum kind loads silently wrong weights)."""
    ckpt = run_copy / "checkpoints"
    what = _damage(kind, ckpt / "iter_0000006")
    assert _main(_overrides(synthetic_corpus, run_copy, "checkpoint.load=auto")) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == (
        f"warning: checkpoint {ckpt / 'iter_0000006'} is damaged ({what}): resuming from "
        f"{ckpt / 'iter_0000004'}, the newest intact one (the damaged one is left in place)"
    )
    assert f"resumed from {ckpt / 'iter_0000004'} at step 4" in out
    expected = read_metrics(six_steps)
    actual = read_metrics(run_copy)
    assert [r["step"] for r in actual] == [1, 2, 3, 4, 5, 6]
    for a, e in zip(actual, expected):
        assert (a["loss"], a["grad_norm"]) == (e["loss"], e["grad_norm"]), a["step"]
    # Nothing destroyed: the damaged checkpoint moved aside when step 6 was saved again, the
    # replaced metrics records in their side file.
    assert (ckpt / "iter_0000006.replaced-1").is_dir()
    assert f"moved the earlier one to {ckpt / 'iter_0000006.replaced-1'}" in out
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.replaced.jsonl").read_text().splitlines()] == [
        5,
        6,
    ]


def test_an_explicit_damaged_checkpoint_is_one_line(run_copy, synthetic_corpus, capsys):
    target = run_copy / "checkpoints" / "iter_0000004"
    what = _damage("truncated", target)
    assert _main(_overrides(synthetic_corpus, run_copy, f"checkpoint.load={target}")) == USER_ERROR
    assert capsys.readouterr().err.splitlines() == [f"error: checkpoint '{target}' is damaged: {what}"]
    assert (target / "__0_0.distcp").is_file()  # never deleted


def test_no_intact_checkpoint_is_one_line(run_copy, synthetic_corpus, capsys):
    ckpt = run_copy / "checkpoints"
    shutil.rmtree(ckpt / "iter_0000002")
    six = _damage("missing shard", ckpt / "iter_0000006")
    four = _damage("garbled metadata", ckpt / "iter_0000004")
    assert _main(_overrides(synthetic_corpus, run_copy, "checkpoint.load=auto")) == USER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"error: checkpoint.load=auto: no intact checkpoint in {ckpt} (iter_0000006: {six}; iter_0000004: {four})"
    ]


def test_checksums_are_read_only_when_verify_is_on(six_steps, tmp_path):
    copy = tmp_path / "iter_0000006"
    shutil.copytree(six_steps / "checkpoints" / "iter_0000006", copy)
    what = _damage("checksum", copy)
    assert manifest.problems(copy, verify=True) == [what]
    assert manifest.problems(copy, verify=False) == []


def test_a_checkpoint_without_manifest_is_checked_against_its_metadata(six_steps, tmp_path):
    """Checkpoints saved before manifests load as before; their sizes come from `.metadata`."""
    copy = tmp_path / "iter_0000006"
    shutil.copytree(six_steps / "checkpoints" / "iter_0000006", copy)
    (copy / manifest.MANIFEST).unlink()
    assert manifest.problems(copy, verify=True) == []
    os.truncate(copy / "__0_1.distcp", 10)
    [line] = manifest.problems(copy, verify=True)
    assert line.startswith("__0_1.distcp is truncated to 10 bytes (its data reaches byte ")


def test_a_checkpoint_without_manifest_resumes_without_a_word(run_copy, synthetic_corpus, capsys):
    ckpt = run_copy / "checkpoints"
    for saved in ckpt.glob("iter_*"):
        (saved / manifest.MANIFEST).unlink()
    assert _main(_overrides(synthetic_corpus, run_copy, "checkpoint.load=auto")) == 0  # at step 6 already
    out, err = capsys.readouterr()
    assert f"resumed from {ckpt / 'iter_0000006'} at step 6" in out.splitlines()
    assert "warning" not in err and "error" not in err, err


def test_keep_last_never_deletes_the_just_saved_or_a_later_checkpoint(tmp_path):
    """A run resumed from step 4 past a damaged step 6 saves step 5 with keep_last 1: 5 stays, and
    so does the damaged 6 (a later step); 2 and 4 go."""
    for step in (2, 4, 5, 6):
        (tmp_path / storage.checkpoint_name(step)).mkdir()
    removed = storage.prune(tmp_path, keep_last=1, newest=5)
    assert sorted(p.name for p in removed) == ["iter_0000002", "iter_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "iter_0000006"]


@pytest.mark.parametrize(
    "change, difference",
    [
        ("model.hidden_size=128", "(384, 128) now; model.hidden_size: 64 in the checkpoint, 128 now"),
        (
            "model.vocab_size=512",
            "(512, 64) now; model.vocab_size: null in the checkpoint, 512 now; vocabulary size: 257 in "
            "the checkpoint, 512 now (data.tokenizer, model.vocab_size)",
        ),
    ],
    ids=["hidden_size", "vocabulary"],
)
def test_resuming_a_changed_model_names_the_parameter_and_the_keys(
    change, difference, run_copy, synthetic_corpus, capsys
):
    ckpt = run_copy / "checkpoints" / "iter_0000006"
    argv = _overrides(synthetic_corpus, run_copy, "checkpoint.load=auto", change, "train.steps=8")
    assert _main(argv) == USER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"error: checkpoint '{ckpt}' holds another model: embedding.word_embeddings.weight is (384, 64) in the "
        f"checkpoint, {difference} (resuming may change the layout, not the model)"
    ]


def test_auto_without_a_checkpoint_says_so_and_keeps_the_metrics(run_copy, synthetic_corpus, capsys):
    """A run stopped before its first checkpoint, restarted with load=auto: one line says it starts
    at step 0, and the earlier records move to metrics.replaced.jsonl (named in a line)."""
    shutil.rmtree(run_copy / "checkpoints")
    before = (run_copy / "metrics.jsonl").read_text()
    argv = _overrides(synthetic_corpus, run_copy, "checkpoint.load=auto", "train.steps=1", "checkpoint.save=false")
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint in {run_copy / 'checkpoints'}: starting at step 0" in out.splitlines()
    side = run_copy / "metrics.replaced.jsonl"
    assert (
        f"{run_copy / 'metrics.jsonl'}: steps 1-6 (6 records) moved to {side}: this run rewrites them from step 1"
        in out.splitlines()
    )
    assert side.read_text() == before
    assert [r["step"] for r in read_metrics(run_copy)] == [1]
    # The recipe of the earlier run (other overrides) is kept too.
    assert (run_copy / "recipe.replaced-1.yaml").is_file()


def test_ranks_split_the_checksums_and_together_find_every_damage(six_steps, tmp_path):
    """Each rank reads the CRC32s of every world-th file (pretrain/checkpoint/storage.py:damage gathers
    them); the sizes every rank checks. Two damaged files at different positions: each rank of 2
    finds one, the two together both."""
    copy = tmp_path / "iter_0000006"
    shutil.copytree(six_steps / "checkpoints" / "iter_0000006", copy)
    first = _damage("checksum", copy)  # __0_0.distcp, the 2nd file in sorted order
    shard = copy / "__0_1.distcp"
    saved = json.loads((copy / manifest.MANIFEST).read_text())["files"]["__0_1.distcp"]["crc32"]
    _flip_a_byte(shard)
    second = f"__0_1.distcp fails its checksum (CRC32 {manifest.crc32_of(shard)}, {saved} when saved)"
    assert manifest.problems(copy, verify=True, share=(0, 2)) == [second]
    assert manifest.problems(copy, verify=True, share=(1, 2)) == [first]
    assert manifest.problems(copy, verify=True) == [first, second]
