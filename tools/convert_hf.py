"""Hugging Face Llama (3.1) / Mixtral / Qwen3 / Qwen3-MoE / DeepSeek-V3 safetensors <-> our megatron-core checkpoints.

    python -m tools.convert_hf import HF_DIR CKPT_DIR     # then: checkpoint.load=CKPT_DIR
    python -m tools.convert_hf export CHECKPOINT HF_DIR    # CHECKPOINT: a checkpoint dir or iter_N

`import` writes a weights-only checkpoint (step 0, no optimizer state) plus CKPT_DIR/model.yaml, the
recipe `model:` section matching the HF config (use it as a recipe's `base:`). dist_checkpointing
reshards on load, so training may start at any layout. `export` reads a checkpoint saved at any
layout (weights only or a training checkpoint; the recipe stored in it gives the architecture) and
writes config.json (with the bos/eos ids: the imported folder's, else data.tokenizer's end of document),
generation_config.json and model.safetensors in fp32 into a folder that holds no Hugging Face model yet. Conversion runs in one CPU process and holds the
whole model in memory (4 bytes per parameter). Errors are one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable
from typing import TypeVar

import torch

from common.errors import UserError, run_tool
from model.config import ModelConfig, check_model
from parallel.config import ParallelConfig
from parallel.layout import init_single_process
from upstream.process import exit_quickly, prepare_process

T = TypeVar("T")


def _progress(items: Iterable[T], desc: str) -> Iterable[T]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, disable=None)


INDEX = "model.safetensors.index.json"


def safetensors_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files to read: the shards `model.safetensors.index.json` names (each must be there), else
    every *.safetensors in the folder."""
    index = hf_dir / INDEX
    if not index.is_file():
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"{hf_dir}: no *.safetensors files (only safetensors checkpoints are read)")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(str(tensor))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{index} is not a safetensors index (a JSON object with a 'weight_map')") from None
    for shard, tensors in sorted(shards.items()):
        if "/" in shard or not (hf_dir / shard).is_file():
            raise UserError(
                f"{hf_dir / shard} does not exist: {INDEX} names it for {len(tensors)} tensors (e.g. {tensors[0]})"
            )
    return [hf_dir / shard for shard in sorted(shards)]


def read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for path in safetensors_files(hf_dir):
        _check_safetensors_size(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in _progress(list(f.keys()), f"reading {path.name}"):
                    tensors[name] = f.get_tensor(name).float()
        except SafetensorError as exc:
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors


def _check_safetensors_size(path: pathlib.Path) -> None:
    """A file cut short (an interrupted download) names both sizes: its 8-byte header length and
    JSON header say where the last tensor ends."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= header_len <= size - 8:
            raise UserError(f"{path} is truncated ({size} bytes): not even its header is complete")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            return  # safetensors itself says what is wrong
    needed = 8 + header_len + end
    if size < needed:
        raise UserError(f"{path} is truncated from {needed} to {size} bytes")


def _build(model_cfg: ModelConfig, vocab_size: int) -> tuple[torch.nn.Module, int]:
    """The model at tensor = pipeline = 1 for `vocab_size` tokens (padded as training pads it)."""
    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size

    vocab = padded_vocab_size(model_cfg, vocab_size, tensor=1)
    # Hugging Face's tensors are mapped onto sequential experts (model/hf.py); a checkpoint of
    # grouped-GEMM experts holds the same sharded tensors, so it loads into these just the same.
    model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, grouped_gemm=False))
    (chunk,) = build_model_chunks(model_cfg, ModelBuild(perform_initialization=False), vocab)
    return chunk, vocab


def _single_process() -> None:
    """Conversion runs in one process: its gloo group and megatron-core's groups at size 1, unless
    the caller (a test, a notebook) already made them."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_single_process()


def import_hf(hf_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    import yaml

    from model.hf import hf_to_ours, load_exactly, model_config_from_hf, without_absent_mtp
    from pretrain.checkpoint import storage
    from pretrain.recipe import Recipe, recipe_to_dict

    config_path = hf_dir / "config.json"
    if not hf_dir.exists():
        raise UserError(f"{hf_dir} does not exist")
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder: give the Hugging Face model's folder (with config.json)")
    if not config_path.is_file():
        raise UserError(f"{hf_dir}: no config.json")
    hf_config = json_object(config_path)
    try:
        model_cfg = model_config_from_hf(hf_config)
    except KeyError as exc:
        raise UserError(f"{config_path} has no {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{config_path}: {exc}") from None
    except UserError as exc:  # model/hf_config.py says "config.json: ...": which one
        raise UserError(f"{config_path}: {str(exc).removeprefix('config.json: ')}") from None
    try:  # the recipe checks, before any tensor is read (e.g. an odd RoPE width)
        check_model(model_cfg, ParallelConfig())
    except UserError as exc:
        raise UserError(f"{config_path} describes a model that cannot be built: {exc}") from None
    if storage.complete_checkpoints(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints: choose an empty directory")
    _single_process()
    tensors = read_hf_tensors(hf_dir)
    if without_absent_mtp(tensors, model_cfg) is not model_cfg:
        print(
            f"config.json: num_nextn_predict_layers {model_cfg.mtp_num_layers} but the checkpoint holds no "
            "multi-token prediction tensors (as transformers saves it): imported without MTP"
        )
        model_cfg = without_absent_mtp(tensors, model_cfg)
    assert model_cfg.vocab_size is not None  # model_config_from_hf reads it from config.json
    model, vocab = _build(model_cfg, model_cfg.vocab_size)
    try:
        ours = hf_to_ours(tensors, model_cfg, vocab)
    except UserError as exc:
        raise UserError(f"{hf_dir}: {exc}") from None
    load_exactly(model, ours, f"{hf_dir}")
    recipe = Recipe(model=model_cfg)
    extra = {"step": 0, "recipe": recipe_to_dict(recipe), "vocab_size": model_cfg.vocab_size, "source": str(hf_dir)}
    extra["hf_token_ids"] = hf_token_ids(hf_dir, hf_config)
    path = storage.save(out_dir, 0, [model], None, extra)
    (out_dir / "model.yaml").write_text(yaml.safe_dump({"model": recipe_to_dict(recipe)["model"]}, sort_keys=False))
    return path


def export_hf(ckpt: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    from safetensors.torch import save_file

    from model.hf import hf_config_from_model, ours_to_hf
    from pretrain.checkpoint import storage
    from pretrain.recipe import model_config_from_dict

    written = sorted(p.name for p in (*out_dir.glob("config.json"), *out_dir.glob("*.safetensors")))
    if written:
        raise UserError(
            f"{out_dir} already holds a Hugging Face model ({', '.join(written)}): choose an empty directory"
        )
    path = storage.resolve_load(str(ckpt), ckpt.parent)
    assert path is not None  # resolve_load gives None only for load None or auto
    extra = storage.read_extra(path)
    if "recipe" not in extra:
        raise UserError(f"checkpoint '{path}' stores no recipe, so its architecture is unknown")
    model_cfg = model_config_from_dict(extra["recipe"]["model"], f"in checkpoint {path}")
    vocab_size = extra.get("vocab_size") or model_cfg.vocab_size
    if vocab_size is None:
        raise UserError(f"checkpoint '{path}' does not record its vocabulary size")
    config = hf_config_from_model(model_cfg, vocab_size)  # refuses what HF cannot express, early
    _single_process()
    model, _ = _build(model_cfg, vocab_size)
    storage.load(path, [model], None)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors = ours_to_hf(ours, model_cfg, vocab_size)
    config_ids, generation_ids = export_token_ids(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config | config_ids, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_ids, indent=2) + "\n")
    save_file(
        _unshared(_progress(sorted(tensors.items()), "writing")),
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out_dir


TOKEN_IDS = ("bos_token_id", "eos_token_id")


def json_object(path: pathlib.Path) -> dict:
    """A Hugging Face folder's JSON file (config.json, generation_config.json) as a dict; a
    one-line UserError naming the file when it is not valid JSON or not an object."""
    try:
        loaded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def hf_token_ids(hf_dir: pathlib.Path, hf_config: dict) -> dict[str, dict]:
    """The special-token ids of a Hugging Face folder, which no tensor holds: config.json's and
    generation_config.json's (which `generate` stops at), kept by import for export."""
    ids = {"config": {k: hf_config[k] for k in TOKEN_IDS if k in hf_config}}
    generation = hf_dir / "generation_config.json"
    if generation.is_file():
        saved = json_object(generation)
        ids["generation"] = {k: saved[k] for k in TOKEN_IDS if k in saved}
    return ids


def export_token_ids(extra: dict) -> tuple[dict, dict]:
    """(config.json's, generation_config.json's) bos/eos ids: the imported folder's own where the
    checkpoint kept them, else the end-of-document id of the recipe's data.tokenizer (what training
    ends each document with; it adds no BOS). Unknown ids are written as null (said on stdout), so
    transformers assumes no family default (Llama's 1 and 2) in their place."""
    kept = extra.get("hf_token_ids")
    if kept:
        return kept["config"], kept.get("generation", kept["config"])
    name = ((extra.get("recipe") or {}).get("data") or {}).get("tokenizer", "byte")
    eod = _tokenizer_eod(name)
    ids = {"bos_token_id": None, "eos_token_id": eod}
    return ids, ids


def _tokenizer_eod(name: str) -> int | None:
    """The end-of-document id of a tokenizer on this machine; None (said) for one that is not here:
    export reads no hub."""
    from data.tokenizer import build_tokenizer

    if name != "byte" and not pathlib.Path(name).exists():
        print(f"config.json: eos_token_id null: data.tokenizer '{name}' is not on this machine")
        return None
    try:
        return build_tokenizer(name).eod
    except UserError as exc:
        print(f"config.json: eos_token_id null: {exc}")
        return None


def _unshared(items: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """fp32 contiguous tensors, none sharing memory with another: safetensors refuses shared ones,
    and DeepSeek-V3's MTP layers hold their own copies of the embedding and the output layer."""
    seen: set[int] = set()
    out = {}
    for name, tensor in items:
        tensor = tensor.detach().float().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF safetensors dir -> weights-only checkpoint dir")
    imp.add_argument("hf_dir", type=pathlib.Path)
    imp.add_argument("out_dir", type=pathlib.Path)
    exp = sub.add_parser("export", help="checkpoint (dir or iter_N) -> HF safetensors dir")
    exp.add_argument("checkpoint", type=pathlib.Path)
    exp.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    prepare_process(quiet=not args.debug)

    def body() -> int:
        if args.command == "import":
            print(f"wrote {import_hf(args.hf_dir, args.out_dir)}")
        else:
            print(f"wrote {export_hf(args.checkpoint, args.out_dir)}")
        return 0

    return run_tool(body, args.debug)


if __name__ == "__main__":
    exit_quickly(main())
