"""Checkpoints with megatron-core dist_checkpointing: complete-or-invisible saves, `auto` resume."""

from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from common.errors import UserError
from common.files import set_aside
from parallel.data_parallel import sharded_state_dict, sync_params
from pretrain.checkpoint import manifest, optimizer_state
from upstream import fixes, safe_loading

LATEST = "latest"
# The distributed optimizer's state formats (checkpoint.optimizer_format): 'fully_reshardable' maps
# the state onto the model's parameters (resume at any layout); 'dp_reshardable' saves each rank's
# flat buffers as is (only the data-parallel size may change). megatron-core's default
# 'fully_sharded_model_space' cannot be saved in 0.16 ("ShardedTensor.flattened_range is not supported").
_ITER = re.compile(r"^iter_(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """Finished checkpoints, oldest first; a save in progress lives under a `.tmp` name."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _ITER.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: pathlib.Path) -> int:
    """N of an `iter_NNNNNNN` folder."""
    match = _ITER.match(path.name)
    if match is None:
        raise ValueError(f"'{path.name}' is not a checkpoint folder name like iter_0000100")
    return int(match.group(1))


def resolve_load(load: str | None, ckpt_dir: pathlib.Path, verify: bool = True) -> pathlib.Path | None:
    """`None` -> no load; `auto` -> newest intact checkpoint in ckpt_dir (or none: see `choose_auto`
    for the line a skipped damaged one gets); else a path, which must be intact (collective when
    the process group is up: the ranks share the checksum reading)."""
    if load is None:
        return None
    if load == "auto":
        return choose_auto(ckpt_dir, verify)[0]
    path = checkpoint_path(pathlib.Path(load))
    problem = damage(path, verify)
    if problem is not None:
        raise UserError(f"checkpoint '{path}' is damaged: {problem}")
    return path


def checkpoint_path(path: pathlib.Path) -> pathlib.Path:
    """The `iter_N` folder a path given by a person means: itself, or what the `latest` of a
    checkpoints folder names. Every tool says the same about a path that is not one."""
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text(errors="replace").strip()
        if not _ITER.match(name):  # never a path: `latest` from elsewhere must not point outside
            raise UserError(f"checkpoint '{path / LATEST}' names '{name[:40]}', not a checkpoint like iter_0000100")
        if not (path / name).is_dir():
            raise UserError(f"checkpoint '{path / LATEST}' names {name}, which does not exist")
        return path / name
    if (path.is_dir() and (path / "metadata.json").is_file()) or _ITER.match(path.name):
        return path
    if (path / "checkpoints").is_dir():
        raise UserError(f"checkpoint '{path}' is a run folder: did you mean '{path / 'checkpoints'}'?")
    raise UserError(
        f"checkpoint '{path}' is neither a checkpoints folder (with '{LATEST}') nor a checkpoint like iter_0000100"
    )


def damage(path: pathlib.Path, verify: bool) -> str | None:
    """What is wrong with checkpoint `path` (pretrain/checkpoint/manifest.py), None when it is intact. With
    the process group up every rank checks the sizes and a share of the checksums, and all get
    the same answer."""
    share = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        found = manifest.problems(path, verify, share)
    except safe_loading.UnsafeFile as exc:  # a hostile checkpoint is refused, never skipped
        raise UserError(f"checkpoint '{path}': {exc}") from None
    if share[1] > 1:
        gathered: list[Any] = [None] * share[1]
        dist.all_gather_object(gathered, found)
        found = [p for rank_found in gathered for p in rank_found]
    found = sorted(set(found))  # the same first line at every world size
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def choose_auto(ckpt_dir: pathlib.Path, verify: bool) -> tuple[pathlib.Path | None, str | None]:
    """`checkpoint.load=auto`: the newest intact checkpoint in ckpt_dir (None when it holds none),
    and the line to print when newer damaged ones were skipped (they are left in place). A folder
    whose every checkpoint is damaged is a UserError naming each."""
    skipped: list[tuple[pathlib.Path, str]] = []
    for path in reversed(complete_checkpoints(ckpt_dir)):
        problem = damage(path, verify)
        if problem is None:
            if not skipped:
                return path, None
            if len(skipped) == 1:
                said = f"checkpoint {skipped[0][0]} is damaged ({skipped[0][1]})"
            else:
                said = "checkpoints " + ", ".join(f"{p} ({why})" for p, why in skipped) + " are damaged"
            many = "ones are" if len(skipped) > 1 else "one is"
            return path, (
                f"warning: {said}: resuming from {path}, the newest intact one (the damaged {many} left in place)"
            )
        skipped.append((path, problem))
    if skipped:
        said = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise UserError(f"checkpoint.load=auto: no intact checkpoint in {ckpt_dir} ({said})")
    return None, None


def refuse_to_overwrite(load: str | None, ckpt_dir: pathlib.Path) -> None:
    """A fresh run (no `checkpoint.load`) must not write over an earlier run's checkpoints."""
    found = complete_checkpoints(ckpt_dir)
    if load is None and found:
        raise UserError(
            f"checkpoint dir '{ckpt_dir}' already holds checkpoints (newest {found[-1].name}): "
            "resume with checkpoint.load=auto, or set another logging.dir / checkpoint.dir"
        )


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    sd = {}
    for i, chunk in enumerate(chunks):
        sd[f"model{i}" if len(chunks) > 1 else "model"] = sharded_state_dict(chunk)
    return sd


def _unwrap(chunk):
    """DDP -> the wrapped module (Float16Module or GPTModel), which knows its sharded state."""
    return getattr(chunk, "module", chunk)


def save(
    ckpt_dir: pathlib.Path,
    step: int,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    extra: dict,
    optimizer_format: str | None = None,
    keep_last: int | None = None,
    async_queue: Any = None,
    pause_before_publish_s: float = 0.0,
    write_delay_s: float = 0.0,
) -> pathlib.Path:
    """Writes `<dir>/iter_N.tmp`, then renames it to `iter_N` and updates `latest` (rank 0).

    `optimizer=None` saves the model only (a weights checkpoint, e.g. converted from Hugging Face);
    otherwise `optimizer_format` is checkpoint.optimizer_format.
    With `async_queue` (megatron-core's AsyncCallsQueue) the shards are written by a background
    process from a snapshot taken now, and the rename happens when the queue finalizes the save
    (`finish_async_saves`): until then the checkpoint is invisible to `auto`, as any partial save.
    `pause_before_publish_s` (debug.save_pause_at_step) waits between writing and publishing;
    `write_delay_s` (debug.save_write_delay_s) delays an async save's background writer.
    """
    from megatron.core import dist_checkpointing

    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (checkpoint_name(step) + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sync_params(chunks)  # parallel.overlap_param_gather left the updated weights to the next forward
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        assert optimizer_format is not None, "a training checkpoint needs checkpoint.optimizer_format"
        sharded = optimizer.sharded_state_dict(state, metadata=_format_metadata(optimizer_format))
        state["optimizer"] = optimizer_state.without_classes(sharded)
    state["extra"] = {
        **extra,
        "kind": "training" if optimizer is not None else "weights",
        "optimizer_format": optimizer_format if optimizer is not None else None,
    }
    publish = partial(_publish, ckpt_dir, tmp, final, keep_last, pause_before_publish_s)
    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        manifest.record_rank_files(tmp, dist.get_rank())
        publish()
        return final
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    # The checksums are computed by the background writer, after its shards are written.
    write = partial(_write_and_record, request.async_fn, tmp, dist.get_rank())
    request = request._replace(async_fn=partial(_delayed, write_delay_s, write) if write_delay_s else write)
    request.finalize_fns.append(publish)
    async_queue.schedule_async_request(request)
    return final


def _write_and_record(write: Any, tmp: pathlib.Path, rank: int, *args: Any, **kwargs: Any) -> Any:
    """In the background writer: this rank's shards, then their sizes and checksums."""
    result = write(*args, **kwargs)
    manifest.record_rank_files(tmp, rank)
    return result


def _delayed(seconds: float, write: Any, *args: Any, **kwargs: Any) -> Any:
    """In the background writer: wait, then write (debug.save_write_delay_s)."""
    time.sleep(seconds)
    return write(*args, **kwargs)


def _publish(
    ckpt_dir: pathlib.Path, tmp: pathlib.Path, final: pathlib.Path, keep_last: int | None, pause_s: float
) -> None:
    """Every rank's shards are written: make the checkpoint visible (collective)."""
    dist.barrier()
    time.sleep(pause_s)
    if dist.get_rank() == 0:
        manifest.write_manifest(tmp)
        if final.exists():  # re-saving the same step (e.g. a resume from an older one): keep the earlier
            kept = set_aside(final)
            print(f"checkpoint {final.name} was saved before: moved the earlier one to {kept}", flush=True)
        os.rename(tmp, final)
        _write_atomic(ckpt_dir / LATEST, final.name)
        if keep_last:
            prune(ckpt_dir, keep_last, newest=checkpoint_step(final))
    dist.barrier()


def new_async_queue():
    """megatron-core's queue of background saves (checkpoint.async_save)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()


def finish_async_saves(queue: Any, blocking: bool = False) -> list[int]:
    """Publishes the background saves that are done (all of them when `blocking`); collective."""
    if queue is None:
        return []
    return queue.maybe_finalize_async_calls(blocking=blocking)


def _format_metadata(optimizer_format: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_format}


def prune(ckpt_dir: pathlib.Path, keep_last: int, newest: int | None = None) -> list[pathlib.Path]:
    """Deletes all but the `keep_last` newest complete checkpoints up to step `newest` (the one just
    saved; default: the newest there), and leftover `.tmp` saves older than it. The just-saved one
    is always kept, and so is every checkpoint of a later step (e.g. a damaged one `auto` skipped)."""
    complete = complete_checkpoints(ckpt_dir)
    if newest is not None:
        complete = [p for p in complete if checkpoint_step(p) <= newest]
    doomed = complete[: max(len(complete) - max(keep_last, 1), 0)]
    newest = checkpoint_step(complete[-1]) if complete else -1
    for stale in ckpt_dir.glob("iter_*.tmp"):
        match = _ITER.match(stale.name[: -len(".tmp")])
        if match and int(match.group(1)) < newest:
            doomed.append(stale)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_refusing_unsafe(template: dict, path: pathlib.Path) -> dict:
    """dist_checkpointing.load; a byte item refused by upstream/safe_loading.py on any rank is
    raised as that one-line UserError instead of torch's gathered multi-rank report."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from upstream.safe_loading import UnsafeFile, refusal_in

    try:
        return dist_checkpointing.load(template, str(path))
    except UnsafeFile as exc:
        refusal: UnsafeFile | None = exc
    except CheckpointException as exc:
        refusal = refusal_in(exc)
        if refusal is None:
            raise
    raise UserError(f"checkpoint '{path}': {refusal}")


def read_extra(path: pathlib.Path) -> dict:
    """The checkpoint's `extra` dict (step, scheduler, recipe, ...), after the safety checks."""
    from megatron.core import dist_checkpointing

    safe_loading.install()
    check_safe_to_load(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    return common.get("extra") or {}


def load(path: pathlib.Path, chunks: Sequence[torch.nn.Module], optimizer: Any) -> dict:
    """Restores model chunks, and the optimizer unless `optimizer` is None or the checkpoint holds
    weights only (`kind: weights`, e.g. converted from Hugging Face: the optimizer keeps its fresh
    state). The optimizer may be of another kind than the one that saved (plain DDP / FSDP, fp16/bf16,
    distributed): pretrain/checkpoint/optimizer_state.py maps one onto the other."""
    from parallel.data_parallel import load_module_state

    extra = read_extra(path)
    weights_only = extra.get("kind") == "weights"
    # Checkpoints from before `optimizer_format` was recorded were all dp_reshardable.
    optimizer_format = None if weights_only or optimizer is None else extra.get("optimizer_format", "dp_reshardable")
    if optimizer_format is not None:
        _check_same_optimizer(extra, optimizer, path)
    template = model_sharded_state_dict(chunks)
    translation, second = None, {}
    if optimizer_format == "dp_reshardable":
        _refuse_other_expert_buffers(extra, chunks, path)
    if optimizer_format is not None:
        translation = _translation(path, optimizer, optimizer_format)
        fixes.give_fresh_adam_a_step(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template,
            is_loading=True,
            metadata=_format_metadata("fully_reshardable" if translation else optimizer_format),
        )
        if translation:
            second = optimizer_state.point_masters(template, *translation[:2], _checkpoint_keys(path))
    # Copies into parameters (and their views inside the optimizer) must not be recorded.
    with torch.no_grad():
        state = _load_refusing_unsafe(template, path)
        if second:
            optimizer_state.fill(template, _load_refusing_unsafe(second, path))
        for i, chunk in enumerate(chunks):
            load_module_state(chunk, state[f"model{i}" if len(chunks) > 1 else "model"])
        if optimizer_format is not None:
            loaded = state["optimizer"]
            if translation:
                kind, _, step = translation
                loaded = optimizer_state.loaded_into(template["optimizer"], loaded)
                optimizer_state.set_step(loaded, kind, step)
            optimizer.load_state_dict(loaded)
    if optimizer_format is not None:
        fixes.restore_adam_steps(optimizer)
    return extra


def _check_same_optimizer(extra: dict, optimizer: Any, path: pathlib.Path) -> None:
    """AdamW's moments are not Muon's momentum (nor the reverse): a resume keeps optimizer.name."""
    from pretrain.muon import optimizer_name

    saved = ((extra.get("recipe") or {}).get("optimizer") or {}).get("name", "adamw")
    current = optimizer_name(optimizer)
    if saved != current:
        raise UserError(
            f"checkpoint '{path}' holds {saved}'s optimizer state and this run has optimizer.name = {current}; "
            f"resume with optimizer.name = {saved}, or start {current} from its weights only (tools/convert_hf.py export, then import)"
        )


def _refuse_other_expert_buffers(extra: dict, chunks: Sequence[torch.nn.Module], path: pathlib.Path) -> None:
    """A dp_reshardable save holds each rank's flat optimizer buffers, laid out by parameter: grouped
    experts (one stack per linear) and sequential ones (one weight per expert) order them otherwise,
    with the same sizes, so such a load would silently scramble the expert state."""
    saved = ((extra.get("recipe") or {}).get("model") or {}).get("moe", {}).get("grouped_gemm", False)
    config = getattr(_unwrap(chunks[0]), "config", None)
    current = bool(getattr(config, "moe_grouped_gemm", False)) if getattr(config, "num_moe_experts", None) else saved
    if bool(saved) != current:
        raise UserError(
            f"checkpoint '{path}' holds dp_reshardable optimizer buffers of "
            f"{'grouped' if saved else 'sequential'} experts; this run has model.moe.grouped_gemm = "
            f"{str(current).lower()}: resume with the saved setting, or from a fully_reshardable save"
        )


def _translation(path: pathlib.Path, optimizer: Any, optimizer_format: str) -> tuple[str, str, int] | None:
    """(current kind, saved kind, Adam's saved step) when another optimizer kind saved the checkpoint;
    None when it is the current one."""
    from megatron.core import dist_checkpointing

    saved_optimizer = dist_checkpointing.load_common_state_dict(str(path)).get("optimizer")
    kind, saved = optimizer_state.current_kind(optimizer), optimizer_state.saved_kind(saved_optimizer)
    if kind == saved:
        return None
    optimizer_state.check_translatable(kind, saved, optimizer_format, str(path))
    step = optimizer_state.saved_step(saved_optimizer)
    return kind, saved, 0 if step is None else step


def _checkpoint_keys(path: pathlib.Path) -> set:
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(path)))


def check_safe_to_load(path: pathlib.Path) -> None:
    """Refuses a checkpoint whose `common.pt` or `.metadata` could run code when loaded, before
    megatron-core opens it (upstream/safe_loading.py checks every other pickle as it is read)."""
    common, metadata = path / "common.pt", path / ".metadata"
    try:
        if common.is_file():
            with open(common, "rb") as f:
                safe_loading.check_weights_only(io.BytesIO(f.read()), f"checkpoint '{path}': common.pt")
        if metadata.is_file():
            safe_loading.unpickle_or_refuse(
                safe_loading.MetadataUnpickler, metadata.read_bytes(), f"checkpoint '{path}': .metadata"
            )
    except (EOFError, RuntimeError, OSError) as exc:
        raise UserError(f"checkpoint '{path}' is unreadable: {' '.join(str(exc).split())[:160]}") from None
