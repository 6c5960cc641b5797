"""Loading a file from elsewhere never runs code: every pickle in a checkpoint or a data cache is read
through an allow-list, and anything outside it is refused with one line before it is unpickled.

What a dist-checkpoint (megatron-core's `torch_dist` format) holds, and who reads it:
- `.metadata`: a pickle torch.distributed.checkpoint reads with plain `pickle.load`
  (filesystem.py, FileSystemReader.read_metadata). Read here with `MetadataUnpickler`, which knows
  only the classes checkpoint metadata is made of.
- `common.pt`: megatron-core reads it with `torch.load` (weights_only by default since torch 2.6);
  checked here with `weights_only=True` explicitly, so a torch default cannot change that.
- byte items (`BytesStorageMetadata` entries inside the `.distcp` files): torch's
  `DefaultLoadPlanner.load_bytes` reads each with `torch.load(weights_only=False)`. Ours hold
  `_extra_state` of every linear layer (a list holding None on the local spec), and with the
  distributed optimizer's dp_reshardable format its param groups and bucket sizes (lists, dicts,
  floats, dtypes): all within torch's weights-only allow-list, which `load_bytes` now applies
  before torch unpickles the item.
- transformer-engine's extra state (TE 2.x): the byte item is a uint8 tensor (weights-only safe),
  but TE's `set_extra_state` then `pickle.loads` its bytes: a dict of the FP8 recipe (a dataclass
  of `transformer_engine.common.recipe`), CPU scale / amax-history tensors and plain values.
  Checked first with `TEStateUnpickler` (those recipe classes, tensors through weights-only loads).

`install()` applies the two patches (the `.metadata` reader and `load_bytes`) and, where
transformer-engine is installed, the extra-state check; every load path calls it.
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from common.errors import UserError


class UnsafeFile(UserError):
    """A pickle names something outside its allow-list: refused, nothing in it has run."""


# Classes a torch.distributed.checkpoint `.metadata` file may name; anything else (os.system, a
# user's class, ...) means the file is not what a save wrote.
_METADATA_GLOBALS: set[tuple[str, str]] = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.planner", name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType")
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # torch layout by name, as torch's own safe unpickler allows
        ("torch", "Size"),
        ("collections", "OrderedDict"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles checkpoint metadata: only `_METADATA_GLOBALS` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _weights_only_storage(data: bytes) -> Any:
    """torch.storage._load_from_bytes (how `pickle.dumps` of a tensor stores its data), weights only."""
    return torch.load(io.BytesIO(data), weights_only=True)


TE_RECIPE_MODULE = "transformer_engine.common.recipe"


class TEStateUnpickler(pickle.Unpickler):
    """Unpickles transformer-engine's FP8 extra state: the recipe dataclasses and enums of
    `transformer_engine.common.recipe`, tensors (their storage through a weights-only load), and
    plain Python values; nothing else."""

    _TENSOR_GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): None,
        ("collections", "OrderedDict"): None,
        ("torch.storage", "_load_from_bytes"): _weights_only_storage,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._TENSOR_GLOBALS:
            return self._TENSOR_GLOBALS[(module, name)] or super().find_class(module, name)
        if module == TE_RECIPE_MODULE and not name.startswith("__"):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type):  # recipe dataclasses, Format enum, named tuples
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def unpickle_or_refuse(unpickler: Callable[[io.BytesIO], pickle.Unpickler], data: bytes, what: str) -> Any:
    """`data` unpickled by `unpickler`; UnsafeFile naming `what` and the refused global otherwise."""
    try:
        return unpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeFile(_refusal(what, str(exc))) from None


def _refusal(what: str, detail: str) -> str:
    """One line from an unpickler's complaint: the global it refused, else torch's reason."""
    if "GLOBAL " in detail:  # torch: "Unsupported global: GLOBAL posix.system was not an allowed global ..."
        reason = f"it names {detail.split('GLOBAL ', 1)[1].split()[0]}"
    elif "WeightsUnpickler error:" in detail:  # e.g. "Unsupported operand 149" (a protocol-4 frame)
        reason = f"not a weights-only pickle: {detail.split('WeightsUnpickler error:', 1)[1].split(chr(10) * 2)[1]}"
    else:  # ours: "module.name"
        reason = f"it names {detail}"
    return f"{what} holds objects a checkpoint may not contain, refusing to unpickle it ({reason})"


def check_weights_only(value: io.BytesIO, what: str) -> None:
    """Raises UnsafeFile unless `value` loads under torch's weights-only unpickler (which runs nothing)."""
    position = value.tell()
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": torch's note, not the user's business
            warnings.simplefilter("ignore", UserWarning)
            torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFile(_refusal(what, str(exc))) from None
    finally:
        value.seek(position)


# ------------------------------------------------------------------------------------------ patches


def _read_metadata_safely(original: Callable) -> Callable:
    """FileSystemReader.read_metadata with `.metadata` first checked by MetadataUnpickler: torch
    reads it with plain pickle (torch/distributed/checkpoint/filesystem.py, read_metadata)."""

    @functools.wraps(original)
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            unpickle_or_refuse(MetadataUnpickler, f.read(), ".metadata")
        return original(self, *args, **kwargs)

    read_metadata._checked = True  # type: ignore[attr-defined]
    return read_metadata


def _load_bytes_weights_only(original: Callable) -> Callable:
    """DefaultLoadPlanner.load_bytes (torch/distributed/checkpoint/default_planner.py), which every
    dist-checkpoint load planner inherits and which unpickles each byte item with
    `weights_only=False`, refusing any item the weights-only unpickler would not load."""

    @functools.wraps(original)
    def load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
        check_weights_only(value, f"byte item '{read_item.dest_index.fqn}'")
        return original(self, read_item, value)

    load_bytes._checked = True  # type: ignore[attr-defined]
    return load_bytes


def check_te_extra_state(state: Any, where: str) -> None:
    """transformer-engine's extra state (a uint8 tensor of pickled bytes; empty = no FP8) holds only
    what TEStateUnpickler accepts. Called before TE's own `pickle.loads` of it."""
    if isinstance(state, torch.Tensor) and state.numel() > 0:
        unpickle_or_refuse(
            TEStateUnpickler, state.detach().cpu().numpy().tobytes(), f"transformer-engine extra state of {where}"
        )


def _set_extra_state_checked(original: Callable) -> Callable:
    @functools.wraps(original)
    def set_extra_state(self, state):
        check_te_extra_state(state, type(self).__name__)
        return original(self, state)

    set_extra_state._checked = True  # type: ignore[attr-defined]
    return set_extra_state


def _te_extra_state_owners() -> Iterable[tuple[Any, str, Callable]]:
    """(class, method, wrapper) for transformer-engine's extra-state readers, when TE is installed:
    TE's base module's set_extra_state and megatron-core's grouped-linear decoder of it."""
    try:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    except ImportError:
        return []
    owners = [(TransformerEngineBaseModule, "set_extra_state", _set_extra_state_checked)]
    try:
        from megatron.core.extensions.transformer_engine import TEGroupedLinear
    except ImportError:
        return owners
    owners.append((TEGroupedLinear, "_decode_extra_state", _decode_extra_state_checked))
    return owners


def _decode_extra_state_checked(original: Callable) -> Callable:
    @functools.wraps(original)
    def decode(self, state):
        check_te_extra_state(state, type(self).__name__)
        return original(self, state)

    decode._checked = True  # type: ignore[attr-defined]
    return decode


def install() -> dict[str, bool]:
    """Applies the checks (idempotent); returns which ones are active. Every load path calls it."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    owners = [
        (FileSystemReader, "read_metadata", _read_metadata_safely),
        (DefaultLoadPlanner, "load_bytes", _load_bytes_weights_only),
        *_te_extra_state_owners(),
    ]
    for cls, method, wrap in owners:
        if not getattr(getattr(cls, method), "_checked", False):
            setattr(cls, method, wrap(getattr(cls, method)))
    return {f"{cls.__name__}.{method}": True for cls, method, _ in owners}


def refusal_in(exc: BaseException) -> UnsafeFile | None:
    """The UnsafeFile a failed dist-checkpoint load carries, if any: torch gathers every rank's
    exception into one CheckpointException (a BaseException)."""
    failures = getattr(exc, "failures", None) or {}
    for wrapped in failures.values():
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, UnsafeFile):
            return inner
    return None
