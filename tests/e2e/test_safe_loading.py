"""Nothing a checkpoint or a data cache carries runs when it is loaded: a planted pickle payload (a
marker file written by `__reduce__`) is refused with one line on every load path, and never runs."""

import dataclasses
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import types
from enum import Enum

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from common.errors import UserError
from pretrain.checkpoint import manifest
from tests.helpers.runs import run_pretrain, tiny_overrides
from tests.helpers.warm import run_python
from upstream import safe_loading


class _Payload:
    """Unpickling this runs `touch <marker>`: what a hostile file would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_in_byte_items(ckpt: pathlib.Path, marker: pathlib.Path, kind: str) -> int:
    """Appends the payload to a .distcp file and points every byte item whose key contains `kind` at
    it, as the issue's attack did; `.metadata` stays made of metadata classes only. Returns how many
    items now point at the payload."""
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own copy of a save
    payload = pickle.dumps(_Payload(marker), protocol=2)  # what torch.save writes (protocol 4 fails earlier)
    target = sorted(ckpt.glob("*.distcp"))[0]
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload)
    planted = 0
    for index, info in list(metadata.storage_data.items()):
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata) and kind in index.fqn:
            metadata.storage_data[index] = dataclasses.replace(
                info, relative_path=target.name, offset=offset, length=len(payload)
            )
            planted += 1
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _forge_manifest(ckpt, [target, ckpt / ".metadata"])
    return planted


def _forge_manifest(ckpt: pathlib.Path, changed: list[pathlib.Path]) -> None:
    """An attacker who can write the files can rewrite their recorded sizes and checksums too: the
    integrity check must pass, so that what is tested is the loading itself."""
    manifest_path = ckpt / manifest.MANIFEST
    record = json.loads(manifest_path.read_text())
    for path in changed:
        record["files"][path.name] = {"size": path.stat().st_size, "crc32": manifest.crc32_of(path)}
    manifest_path.write_text(json.dumps(record))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


@pytest.fixture
def planted(reference, tmp_path):
    """A copy of the reference run's step-10 checkpoint with its `_extra_state` byte items hostile."""
    log_dir, _ = reference
    ckpt = tmp_path / "ckpt" / "iter_0000010"
    shutil.copytree(log_dir / "checkpoints" / "iter_0000010", ckpt)
    assert plant_in_byte_items(ckpt, tmp_path / "pwned", "_extra_state") == 16  # 4 layers x 4 linears
    return ckpt


def test_byte_item_payload_is_refused_on_resume(planted, synthetic_corpus, tmp_path):
    proc = run_pretrain(
        1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "run", f"checkpoint.load={planted}"), check=False
    )
    assert (
        _one_error_line(proc).startswith(f"error: checkpoint '{planted}': byte item 'decoder.layers.")
        and "(it names posix.system)" in proc.stderr
    )
    assert not (tmp_path / "pwned").exists()


def test_byte_item_payload_is_refused_by_export(planted, tmp_path):
    proc = run_python(["-m", "tools.convert_hf", "export", str(planted), str(tmp_path / "hf")], timeout=300)
    assert "refusing to unpickle it (it names posix.system)" in _one_error_line(proc)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_byte_item_payload_is_refused_at_two_ranks(planted, synthetic_corpus, tmp_path):
    """Every rank reads byte items: under the launcher the run ends with exit 2, nothing ran."""
    overrides = tiny_overrides(synthetic_corpus, tmp_path / "run", f"checkpoint.load={planted}", "parallel.tensor=2")
    proc = run_pretrain(2, "tiny_gpt", overrides, check=False, launcher=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: checkpoint '{planted}': byte item" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_optimizer_byte_items_are_checked(synthetic_corpus, tmp_path):
    """dp_reshardable distributed-optimizer state is a second kind of byte item (param groups, bucket sizes)."""
    overrides = tiny_overrides(
        synthetic_corpus,
        tmp_path / "run",
        "train.steps=2",
        "parallel.distributed_optimizer=true",
        "checkpoint.optimizer_format=dp_reshardable",
    )
    run_pretrain(1, "tiny_gpt", overrides)
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    assert plant_in_byte_items(ckpt, tmp_path / "pwned", "optimizer") >= 3
    proc = run_pretrain(1, "tiny_gpt", [*overrides, "train.steps=3", "checkpoint.load=auto"], check=False)
    assert _one_error_line(proc).startswith(f"error: checkpoint '{ckpt}': byte item '")
    assert not (tmp_path / "pwned").exists()


def test_torch_unpickles_byte_items_and_the_check_refuses_first(tmp_path):
    """The upstream site: DefaultLoadPlanner.load_bytes runs a byte item's payload (weights_only=False);
    wrapped by safe_loading it refuses before anything runs."""
    original = getattr(DefaultLoadPlanner.load_bytes, "__wrapped__", DefaultLoadPlanner.load_bytes)
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="layer._extra_state/shard_0_1"))
    marker = tmp_path / "pwned"
    with pytest.raises(safe_loading.UnsafeFile, match=r"byte item 'layer._extra_state/shard_0_1' holds objects"):
        safe_loading._load_bytes_weights_only(original)(planner, item, io.BytesIO(pickle.dumps(_Payload(marker))))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="Invalid magic number"):  # torch.load fails, after the payload ran
        original(planner, item, io.BytesIO(pickle.dumps(_Payload(marker))))
    assert marker.exists()


def test_metadata_reader_is_checked_too(reference, tmp_path):
    """FileSystemReader.read_metadata (plain pickle upstream), for readers other than our pre-check."""
    safe_loading.install()
    log_dir, _ = reference
    ckpt = tmp_path / "iter"
    shutil.copytree(log_dir / "checkpoints" / "iter_0000010", ckpt)
    assert FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(safe_loading.UnsafeFile, match=r"\.metadata holds objects .* \(it names posix.system\)"):
        FileSystemReader(str(ckpt)).read_metadata()
    assert not marker.exists()


# ------------------------------------------------------------------------ transformer-engine state


class Format(Enum):  # stand-ins for transformer_engine.common.recipe (TE cannot be installed here)
    E4M3 = "E4M3"
    HYBRID = "HYBRID"


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@pytest.fixture
def te_recipe_module(monkeypatch):
    """A module named like TE's recipe module holding the stand-ins, so pickles name TE's classes."""
    module = types.ModuleType(safe_loading.TE_RECIPE_MODULE)
    for cls in (Format, DelayedScaling):
        monkeypatch.setattr(cls, "__module__", module.__name__)
        setattr(module, cls.__name__, cls)
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _te_extra_state(state) -> torch.Tensor:
    """What TE 2.x's get_extra_state returns: the pickled state as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def test_te_extra_state_loads_under_the_rule(te_recipe_module):
    """TE 2.x's FP8 state (transformer_engine/pytorch/module/base.py get_extra_state): the recipe,
    CPU scale / amax-history tensors and plain values."""
    state = {
        "recipe": DelayedScaling(margin=1),
        "scale_fwd": torch.ones(3),
        "amax_history_fwd": torch.zeros(4, 3),
        "scale_bwd": torch.ones(2),
        "amax_history_bwd": torch.zeros(4, 2),
        "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True, "fp8_group": None},
    }
    safe_loading.check_te_extra_state(_te_extra_state(state), "Linear")
    loaded = safe_loading.unpickle_or_refuse(
        safe_loading.TEStateUnpickler, _te_extra_state(state).numpy().tobytes(), "state"
    )
    assert loaded["recipe"] == DelayedScaling(margin=1) and torch.equal(loaded["amax_history_fwd"], torch.zeros(4, 3))
    safe_loading.check_te_extra_state(torch.empty(0, dtype=torch.uint8), "Linear")  # no FP8: empty


def test_te_extra_state_payload_never_reaches_te(te_recipe_module, tmp_path):
    marker = tmp_path / "pwned"

    class TELinear:  # TE's own set_extra_state: pickle.loads of the tensor's bytes
        def set_extra_state(self, state):
            self.state = pickle.loads(state.numpy().tobytes())

    hostile = _te_extra_state({"recipe": DelayedScaling(), "extra_fp8_variables": {"x": _Payload(marker)}})
    checked = safe_loading._set_extra_state_checked(TELinear.set_extra_state)
    with pytest.raises(
        safe_loading.UnsafeFile, match=r"transformer-engine extra state of TELinear holds .* \(it names posix.system\)"
    ):
        checked(TELinear(), hostile)
    assert not marker.exists()
    TELinear().set_extra_state(hostile)  # unchecked, TE would run it
    assert marker.exists()


# --------------------------------------------------------------------------------------- data cache


def test_planted_data_cache_index_is_refused(reference, synthetic_corpus, tmp_path):
    """megatron-core loads its cached indices with numpy.load(allow_pickle=True), which unpickles a
    file that lacks the .npy header."""
    log_dir, _ = reference
    cache = tmp_path / "cache"
    shutil.copytree(log_dir / "data_cache", cache)
    (index,) = cache.glob("*/*document_index.npy")
    marker = tmp_path / "pwned"
    index.write_bytes(pickle.dumps(_Payload(marker)))
    proc = run_pretrain(
        1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "run", f"data.cache_dir={cache}"), check=False
    )
    assert _one_error_line(proc) == (
        f"error: data cache file '{index}' is not a plain numpy array (loading it could run code): "
        f"delete the folder '{index.parent}' and it is built again"
    )
    assert not marker.exists()


def test_object_arrays_in_the_data_cache_are_refused(tmp_path):
    import numpy

    from data.dataset import check_cache_files

    numpy.save(tmp_path / "a.npy", numpy.arange(4))
    check_cache_files(str(tmp_path))
    numpy.save(tmp_path / "b.npy", numpy.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="data cache file .*b.npy' is not a plain numpy array"):
        check_cache_files(str(tmp_path))
