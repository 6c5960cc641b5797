"""Recipe schema: nested config dataclasses, YAML loading with `base:` inheritance, CLI overrides, validation.

Merge order: dataclass defaults < base chain (root first) < recipe < CLI overrides. Each layer (file or
override) is checked on its own against the schema, so an unknown key or a wrong type is reported with the
file it came from; `validate_static` then checks the merged recipe once, and `validate_for_world` adds the
checks that need the number of ranks.
"""

import dataclasses
import difflib
import math
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from pretrain.errors import RecipeError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"

PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "wsd", "constant")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
CONTEXT_COMMS = ("p2p", "a2a", "all_gather")  # transformer-engine's cp_comm_type values we pass on
WANDB_MODES = ("online", "offline", "disabled")
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_MODES = ("skip", "stop")

COMMAND_LINE = "on the command line"  # where-phrase for override errors (files read "in <path>")


# ----------------------------------------------------------------------------------------------- schema


MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
MOE_DROP_POLICIES = ("probs", "position")
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class MoeConfig:
    """Mixture of experts in place of the MLP (megatron-core's MoELayer); num_experts: null = dense."""

    num_experts: Optional[int] = None  # routed experts per MoE layer; null = a dense model
    top_k: int = 2  # experts per token
    ffn_hidden_size: Optional[int] = None  # SwiGLU inner size of one expert; null = model.ffn_hidden_size
    shared_expert_ffn_hidden_size: Optional[int] = None  # inner size of all shared experts together; null = none
    layer_freq: int = 1  # every N-th layer is MoE (1 = all), counted after first_dense_layers
    first_dense_layers: int = 0  # leading dense layers (DeepSeek's first_k_dense_replace)
    score_function: str = "softmax"  # softmax | sigmoid (router scores)
    pre_softmax: bool = False  # softmax over all experts before top-k (else over the chosen top-k)
    load_balancing: str = "aux_loss"  # aux_loss (per micro-batch) | seq_aux_loss (per sequence) | none
    aux_loss_coeff: float = 1e-2  # weight of the load-balancing loss
    z_loss_coeff: float = 0.0  # weight of the router z-loss (logit size); 0 = off
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3): a routing bias nudged each step
    bias_update_rate: float = 1e-3  # expert-bias step size, per optimizer step
    capacity_factor: Optional[float] = None  # tokens an expert takes, x its fair share; null = dropless
    drop_policy: str = "probs"  # over capacity, drop the lowest-probability (probs) or latest (position)
    pad_to_capacity: bool = False  # pad every expert's input to its capacity (needs capacity_factor)
    dispatcher: str = "alltoall"  # alltoall | allgather: how tokens reach expert-parallel ranks
    grouped_gemm: bool = False  # one grouped GEMM for all local experts (GPU, transformer-engine)


@dataclass
class ModelConfig:
    """Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP (or mixture of experts)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176  # SwiGLU inner size
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = same as heads (MHA); < heads = grouped-query attention
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary (data.tokenizer); padded later
    make_vocab_size_divisible_by: int = 128  # padding multiple (times parallel.tensor), as Megatron-LM
    seq_length: int = 128  # tokens per sample
    rotary_base: float = 10000.0  # RoPE theta
    norm_epsilon: float = 1e-5  # RMSNorm epsilon
    untie_embeddings: bool = True  # True = separate output layer; False = share the input embedding
    init_method_std: float = 0.02  # std of the normal weight init
    hidden_dropout: float = 0.0  # probability, [0, 1)
    attention_dropout: float = 0.0  # probability, [0, 1)
    transformer_impl: str = "local"  # local | transformer_engine
    add_bias_linear: bool = False  # biases in attention and MLP/expert linears (GPT-2 style); Llama has none
    moe: MoeConfig = field(default_factory=MoeConfig)


@dataclass
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left of the world size."""

    tensor: int = 1  # ranks that split each layer's weights
    pipeline: int = 1  # ranks that split the layer stack
    virtual_pipeline: Optional[int] = None  # None = no interleaving; else model chunks per pipeline rank
    context: int = 1  # ranks that split each sequence
    # How context-parallel attention communicates. p2p: K/V travel around a ring (ours with the local
    # layers, transformer-engine's otherwise); a2a (all-to-all between sequence and heads) and
    # all_gather (of K/V) exist only in transformer-engine's attention.
    context_comm: str = "p2p"  # p2p | a2a | all_gather
    expert: int = 1  # ranks that split the experts (MoE); carved out of the data-parallel ranks
    expert_tensor: Optional[int] = None  # ranks that split each expert's weights; null = parallel.tensor
    sequence_parallel: bool = False  # shard activations along the sequence inside tensor-parallel regions
    distributed_optimizer: bool = False  # shard optimizer state across data-parallel ranks
    # Uneven pipeline split (no virtual pipeline): layers on the first / last stage, e.g. fewer
    # where the embedding or the output layer and loss live; the rest split evenly. None = even.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 10  # optimizer steps
    global_batch_size: int = 8  # samples per optimizer step, across data-parallel ranks
    micro_batch_size: int = 2  # samples per forward/backward on one rank
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    device: str = "auto"  # auto | cpu | cuda ; auto = cuda when available
    # Fault guards (pretrain/guards.py). A step whose loss or gradients are not finite never updates
    # the model; `skip` drops the step (its batch and lr slot are still consumed) and goes on, `stop`
    # ends the run with exit code 3.
    on_nonfinite: str = "skip"  # skip | stop
    max_skipped_steps: int = 10  # skip: stop once more steps than this were skipped (resumes included)
    # Report rank, step, phase and Python stacks on stderr when one phase of a step (forward_backward,
    # optimizer, logging, checkpoint) runs longer than this; seconds, 0 = no watchdog.
    watchdog_timeout_s: float = 0.0
    # Validation: every eval_interval optimizer steps (and after the last), the token-mean loss over
    # eval_steps global batches of the validation data, logged as val_loss and val_ppl. 0 = never.
    # The same validation samples each time, so successive val_loss values are comparable.
    eval_interval: int = 0
    eval_steps: int = 10  # global batches (of train.global_batch_size samples) per validation
    # After the last step, the same loss over eval_steps global batches of the test share of
    # data.split (its third number), logged as test_loss and test_ppl.
    test_at_end: bool = False


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then a decay schedule down to min_lr."""

    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5  # learning rate at the end of decay
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)  # YAML gives a list of 2 floats
    eps: float = 1e-8
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    decay: str = "cosine"  # cosine | linear | wsd | constant
    decay_steps: Optional[int] = None  # None = train.steps - warmup_steps
    wsd_decay_steps: Optional[int] = None  # only for decay: wsd; None = 10% of decay_steps


@dataclass
class DataConfig:
    """Indexed datasets (PREFIX.bin / PREFIX.idx) blended, split by documents, packed into samples."""

    path: Optional[str] = None  # one indexed dataset prefix; shorthand for blend: [[1.0, path]]
    # Several datasets: [[weight, prefix], ...], each weight > 0 (normalized to sum 1); a sample is
    # drawn from each in proportion to its weight. Only one of path / blend.
    blend: Optional[List[Tuple[float, str]]] = None
    # Shares of each dataset's documents for train,valid,test (Megatron-LM's --split), e.g. "98,1,1".
    split: str = "100,0,0"
    # Separate validation data instead of a valid share of data.split: a prefix, or a weighted blend.
    valid_path: Optional[str] = None
    valid_blend: Optional[List[Tuple[float, str]]] = None
    # Where megatron-core caches its document/sample/shuffle indices; None = <logging.dir>/data_cache.
    cache_dir: Optional[str] = None
    eod_mask_loss: bool = False  # no loss on the prediction made at each EOD token (Megatron-LM's)
    # Restart positions / attention at each EOD inside a packed sample (Megatron-LM's flags). Refused:
    # the model's RoPE ignores position_ids and its attention is causal over the whole sample.
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    tokenizer: str = "byte"  # byte (built-in, 257 ids), a local tokenizer.json (or its folder), or a hub name
    # Processes that build the next training step's micro-batches while the model computes this one
    # (a torch DataLoader, pinned memory on GPUs; validation batches are built in the training
    # process); 0 = build them in the training process. The samples are the same either way.
    num_workers: int = 0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <logging.dir>/checkpoints
    interval: int = 0  # save every N steps; 0 = only at the end
    load: Optional[str] = None  # None | "auto" (latest complete checkpoint in dir) | a path
    save: bool = True
    keep_last: Optional[int] = None  # keep the N newest complete checkpoints (null = all); never deletes the newest
    async_save: bool = False  # write shards in a background process while training goes on
    # Distributed-optimizer state: fully_reshardable (resume at any layout; gathered per data-parallel
    # group when saving) | dp_reshardable (each rank's shard as is: faster, only the data-parallel size may change)
    optimizer_format: str = "fully_reshardable"


@dataclass
class WandbConfig:
    project: str = "pretrain"
    name: Optional[str] = None  # None = logging.name
    mode: str = "offline"  # online | offline | disabled


@dataclass
class DebugConfig:
    """Fault injection, to watch the fault guards work (tests, a new cluster); never set in a real run."""

    nan_loss_at_step: Optional[int] = None  # 1-based step whose loss is multiplied by NaN on every rank
    stall_at_step: Optional[int] = None  # 1-based step whose forward/backward first sleeps debug.stall_s
    stall_s: float = 0.0  # seconds


@dataclass
class LoggingConfig:
    name: str = "run"  # run name; no '/'
    dir: Optional[str] = None  # None = runs/<name>
    interval: int = 1  # log every N steps
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Recipe:
    """A whole run. Components receive their own section, never the whole recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # Path of the recipe file it was loaded from; not a YAML key.
    source: Optional[str] = field(default=None, metadata={"yaml": False})

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks: world_size // (tensor × pipeline × context); see validate_for_world."""
        p = self.parallel
        return world_size // (p.tensor * p.pipeline * p.context)


# ------------------------------------------------------------------------------------------ YAML files


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-4`) and booleans (true/false only); duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 booleans: only true/false, so `mode: off` or `name: no` stay strings (the "Norway problem").
_BOOL_TAG = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _display(path: pathlib.Path) -> str:
    """A path as a person wants to read it: relative to the cwd when inside it, else absolute."""
    absolute = pathlib.Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(absolute)


def _parse_yaml(text: str, prefix: str, with_line: bool = True) -> Any:
    """YAML text -> value; a syntax error becomes one line: `<prefix>[ line N]: <problem>`."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None and with_line else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise RecipeError(f"{prefix}{line}: {problem}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{prefix}: {' '.join(str(exc).split())}") from None


def _read_recipe_file(path: pathlib.Path) -> Dict[str, Any]:
    """One recipe file as a dict (empty file = {}); `base` stays in it."""
    where = f"in {_display(path)}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {_display(path)}: {exc}") from None
    data = _parse_yaml(text, f"invalid YAML {where}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping of sections at the top level {where}, got {_describe(data)}")
    return data


# ----------------------------------------------------------------------------------- finding recipes


def _candidates(name: str) -> List[pathlib.Path]:
    paths = [pathlib.Path(name), RECIPES_DIR / name]
    if not name.endswith((".yaml", ".yml")):
        paths.append(RECIPES_DIR / f"{name}.yaml")
    return paths


def resolve_recipe_path(name_or_path: str) -> pathlib.Path:
    """An existing file as given; else recipes/NAME or recipes/NAME.yaml under the repo root."""
    candidates = _candidates(name_or_path)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(_display(p) for p in candidates)
    raise RecipeError(f"recipe '{name_or_path}' not found: looked for {looked}")


def _resolve_base(base: Any, child: pathlib.Path) -> pathlib.Path:
    """`base:` of `child`: relative to the child's folder first, then like a recipe name."""
    where = f"in {_display(child)}"
    if not isinstance(base, str) or not base:
        raise RecipeError(f"wrong type for 'base' {where}: expected a recipe name or path, got {_describe(base)}")
    candidates = [child.parent / base] + _candidates(base)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(_display(p) for p in candidates)
    raise RecipeError(f"base recipe '{base}' {where} not found: looked for {looked}")


def _file_chain(path: pathlib.Path) -> List[Tuple[pathlib.Path, Dict[str, Any]]]:
    """The recipe and its bases, root base first; a cycle is an error."""
    chain: List[Tuple[pathlib.Path, Dict[str, Any]]] = []
    seen: List[pathlib.Path] = []
    current: Optional[pathlib.Path] = path
    while current is not None:
        real = current.resolve()
        if real in seen:
            names = " -> ".join(_display(p) for p in seen + [real])
            raise RecipeError(f"cyclic base chain: {names}")
        seen.append(real)
        data = _read_recipe_file(current)
        base = data.pop("base", None)  # `base: null` = no base
        chain.append((current, data))
        current = _resolve_base(base, current) if base is not None else None
    return list(reversed(chain))


# ------------------------------------------------------------------------------ checking one layer


class _Mismatch(Exception):
    """A value does not fit a field's type; turned into a RecipeError naming the key."""


def _yaml_fields(cls) -> Dict[str, Any]:
    """Field name -> resolved type, for the fields that are YAML keys."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def _describe(value: Any) -> str:
    """A value as it would appear in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _optional_inner(tp: Any) -> Optional[Any]:
    """X for Optional[X], else None."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def _expected(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or null"
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if all(a in (int, float) for a in args):
            return f"a list of {len(args)} numbers"
        return f"a list [{', '.join(_expected(a) for a in args)}]"
    if get_origin(tp) is list:
        return f"a list, each item {_expected(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping of keys)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _convert_scalar(value: Any, tp: Any) -> Any:
    if isinstance(value, bool) != (tp is bool):
        raise _Mismatch
    if tp is bool or (tp is str and isinstance(value, str)):
        return value
    if tp is int and isinstance(value, int):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    raise _Mismatch


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` as type `tp` (not Optional); raises _Mismatch, or RecipeError from inside a section."""
    if dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, dict):
            raise _Mismatch
        return _clean_section(value or {}, tp, key, where)
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert_scalar(v, a) for v, a in zip(value, args))
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, get_args(tp)[0], key, where) for v in value]
    return _convert_scalar(value, tp)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None and value is None:
        return None
    try:
        return _convert(value, inner if inner is not None else tp, key, where)
    except _Mismatch:
        raise RecipeError(
            f"wrong type for '{key}' {where}: expected {_expected(tp)}, got {_describe(value)}") from None


def _all_keys(cls, prefix: str = "") -> List[str]:
    """Every dotted key of the schema under `cls`, sections included."""
    keys = []
    for name, tp in _yaml_fields(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{dotted}."))
    return keys


def _unknown_key(key: Any, section: str, valid: Sequence[str], where: str) -> RecipeError:
    """Error for an unknown key, suggesting the closest sibling, else the closest key anywhere."""
    dotted = f"{section}.{key}" if section else str(key)
    match = difflib.get_close_matches(str(key), list(valid), n=1)
    if match:
        suggestion = f"{section}.{match[0]}" if section else match[0]
    else:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(_all_keys(Recipe))}
        leaf = difflib.get_close_matches(str(key), list(by_leaf), n=1, cutoff=0.8)
        suggestion = by_leaf[leaf[0]] if leaf else None
    if suggestion:
        return RecipeError(f"unknown key '{dotted}' {where}; did you mean '{suggestion}'?")
    scope = f"under '{section}'" if section else "at the top level"
    return RecipeError(f"unknown key '{dotted}' {where}; valid keys {scope}: {', '.join(valid)}")


def _clean_section(raw: Dict[Any, Any], cls, section: str, where: str) -> Dict[str, Any]:
    """Check one layer's `section` against `cls`: unknown keys and types; values converted."""
    fields = _yaml_fields(cls)
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(key, section, list(fields), where)
        dotted = f"{section}.{key}" if section else key
        out[key] = _coerce(value, fields[key], dotted, where)
    return out


# ------------------------------------------------------------------------------- merging and loading


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """Deep merge of mappings; a list or scalar in `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> Dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"override '{text}' is not of the form key.path=value (e.g. train.steps=100)")
    value = _parse_yaml(raw, f"invalid value in override '{text}' {COMMAND_LINE}", with_line=False)
    for part in reversed(parts):
        value = {part: value}
    return value


def _build(cls, tree: Dict[str, Any]):
    kwargs = {}
    for name, tp in _yaml_fields(cls).items():
        if name in tree:
            kwargs[name] = _build(tp, tree[name]) if dataclasses.is_dataclass(tp) else tree[name]
    return cls(**kwargs)


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Recipe from a file (and its `base:` chain) plus `key.path=value` overrides, validated statically."""
    path = resolve_recipe_path(name_or_path)
    merged: Dict[str, Any] = {}
    for file, data in _file_chain(path):
        merged = _merge(merged, _clean_section(data, Recipe, "", f"in {_display(file)}"))
    for text in overrides:
        merged = _merge(merged, _clean_section(_parse_override(text), Recipe, "", COMMAND_LINE))
    recipe = _build(Recipe, merged)
    recipe.source = str(path)
    validate_static(recipe)
    return recipe


def model_config_from_dict(tree: Dict[str, Any], where: str) -> ModelConfig:
    """A `model:` section (e.g. the recipe stored in a checkpoint) checked against the schema."""
    return _build(ModelConfig, _clean_section(tree, ModelConfig, "model", where))


# ------------------------------------------------------------------------------------------ validation


def _get(recipe: Recipe, dotted: str) -> Any:
    value: Any = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


_POSITIVE = (
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size", "model.num_attention_heads",
    "model.num_query_groups", "model.vocab_size", "model.make_vocab_size_divisible_by", "model.seq_length",
    "model.rotary_base", "model.norm_epsilon", "model.init_method_std",
    "parallel.tensor", "parallel.pipeline", "parallel.virtual_pipeline", "parallel.context", "parallel.expert",
    "train.steps", "train.global_batch_size", "train.micro_batch_size",
    "optimizer.lr", "optimizer.eps", "optimizer.decay_steps", "optimizer.wsd_decay_steps",
    "logging.interval", "parallel.expert_tensor", "checkpoint.keep_last", "train.eval_steps",
    "model.moe.num_experts", "model.moe.top_k", "model.moe.ffn_hidden_size",
    "model.moe.shared_expert_ffn_hidden_size", "model.moe.layer_freq", "model.moe.capacity_factor",
    "debug.nan_loss_at_step", "debug.stall_at_step",
)  # None (an unset optional) is skipped
_NON_NEGATIVE = (
    "train.seed", "train.grad_clip", "optimizer.min_lr", "optimizer.weight_decay", "optimizer.warmup_steps",
    "data.num_workers", "checkpoint.interval", "train.max_skipped_steps", "train.watchdog_timeout_s",
    "debug.stall_s", "train.eval_interval",
    "model.moe.first_dense_layers", "model.moe.aux_loss_coeff", "model.moe.z_loss_coeff",
    "model.moe.bias_update_rate",
)
_CHOICES = (
    ("model.transformer_impl", TRANSFORMER_IMPLS), ("train.precision", PRECISIONS),
    ("train.device", DEVICES), ("optimizer.decay", DECAYS), ("logging.wandb.mode", WANDB_MODES),
    ("model.moe.score_function", MOE_SCORE_FUNCTIONS), ("model.moe.load_balancing", MOE_LOAD_BALANCING),
    ("model.moe.drop_policy", MOE_DROP_POLICIES), ("model.moe.dispatcher", MOE_DISPATCHERS),
    ("checkpoint.optimizer_format", OPTIMIZER_FORMATS), ("train.on_nonfinite", NONFINITE_MODES),
    ("parallel.context_comm", CONTEXT_COMMS),
)


def _check_ranges(recipe: Recipe) -> None:
    for key in _POSITIVE:
        value = _get(recipe, key)
        if value is not None and not value > 0:
            raise RecipeError(f"{key} must be positive, got {value}")
    for key in _NON_NEGATIVE:
        value = _get(recipe, key)
        if not value >= 0:
            raise RecipeError(f"{key} must be non-negative, got {value}")
    for key in ("model.hidden_dropout", "model.attention_dropout"):
        value = _get(recipe, key)
        if not 0 <= value < 1:
            raise RecipeError(f"{key} must be in [0, 1), got {value}")
    for key, choices in _CHOICES:
        value = _get(recipe, key)
        if value not in choices:
            raise RecipeError(f"{key} must be one of {' | '.join(choices)}, got '{value}'")
    name = recipe.logging.name
    if not name or "/" in name:
        raise RecipeError(f"logging.name must be a non-empty name without '/', got '{name}'")


def _require_divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    if dividend % divisor:
        raise RecipeError(f"{divisor_name} = {divisor} does not divide {dividend_name} = {dividend}")


def _check_model_shape(recipe: Recipe) -> None:
    m, p = recipe.model, recipe.parallel
    heads = "model.num_attention_heads"
    _require_divides(heads, m.num_attention_heads, "model.hidden_size", m.hidden_size)
    if m.num_query_groups is not None:
        _require_divides("model.num_query_groups", m.num_query_groups, heads, m.num_attention_heads)
    _require_divides("parallel.tensor", p.tensor, heads, m.num_attention_heads)
    if m.num_query_groups is not None:
        _require_divides("parallel.tensor", p.tensor, "model.num_query_groups", m.num_query_groups)
    if p.first_stage_layers is not None or p.last_stage_layers is not None:
        _check_uneven_pipeline(recipe)
    elif p.virtual_pipeline is None:
        _require_divides("parallel.pipeline", p.pipeline, "model.num_layers", m.num_layers)
    else:
        _require_divides("parallel.pipeline × parallel.virtual_pipeline", p.pipeline * p.virtual_pipeline,
                         "model.num_layers", m.num_layers)
    if p.context > 1:  # each sequence is split into 2 × context chunks (load-balanced causal attention)
        _require_divides("2 × parallel.context", 2 * p.context, "model.seq_length", m.seq_length)
        if p.context_comm != "p2p" and m.transformer_impl == "local":
            raise RecipeError(f"parallel.context_comm = {p.context_comm} needs model.transformer_impl = "
                              f"transformer_engine; the local layers' ring attention is p2p")
        if p.context_comm == "a2a":  # all-to-all trades sequence shards for head shards
            _require_divides("parallel.tensor × parallel.context", p.tensor * p.context,
                             "model.num_query_groups" if m.num_query_groups else heads,
                             m.num_query_groups or m.num_attention_heads)
        if m.attention_dropout > 0 and m.transformer_impl == "local":
            raise RecipeError(f"parallel.context = {p.context} uses ring attention, which has no attention "
                              f"dropout: set model.attention_dropout = 0 (got {m.attention_dropout})")
    if p.sequence_parallel:
        _require_divides("parallel.tensor", p.tensor, "model.seq_length / parallel.context",
                         m.seq_length // p.context)


def pipeline_stage_layers(parallel: ParallelConfig, num_layers: int) -> List[int]:
    """Layers held by each pipeline rank (all its virtual chunks together)."""
    first, last, pp = parallel.first_stage_layers, parallel.last_stage_layers, parallel.pipeline
    if first is None and last is None:
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    per_middle = middle // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _check_uneven_pipeline(recipe: Recipe) -> None:
    p, layers = recipe.parallel, recipe.model.num_layers
    keys = [k for k in ("first_stage_layers", "last_stage_layers") if getattr(p, k) is not None]
    named = " and ".join(f"parallel.{k}" for k in keys)
    if p.pipeline < 2:
        raise RecipeError(f"{named} requires parallel.pipeline > 1, got parallel.pipeline = {p.pipeline}")
    if p.virtual_pipeline is not None:
        raise RecipeError(f"{named} cannot be combined with parallel.virtual_pipeline")
    for key in keys:
        if getattr(p, key) < 1:
            raise RecipeError(f"parallel.{key} must be positive, got {getattr(p, key)}")
    middle_stages = p.pipeline - len(keys)
    middle = layers - sum(getattr(p, k) for k in keys)
    if middle < middle_stages or (middle_stages == 0 and middle != 0) or (middle_stages and middle % middle_stages):
        raise RecipeError(
            f"{named} leave {middle} of model.num_layers = {layers} for {middle_stages} other pipeline "
            f"stage(s): they must split evenly, at least one layer each")


def moe_layer_pattern(model: ModelConfig) -> List[bool]:
    """Which layers are MoE: none for a dense model; else after `first_dense_layers`, every `layer_freq`-th."""
    moe = model.moe
    if moe.num_experts is None:
        return [False] * model.num_layers
    return [i >= moe.first_dense_layers and (i - moe.first_dense_layers) % moe.layer_freq == 0
            for i in range(model.num_layers)]


def _check_moe(recipe: Recipe) -> None:
    moe, p = recipe.model.moe, recipe.parallel
    if moe.num_experts is None:
        if p.expert > 1:
            raise RecipeError(f"parallel.expert = {p.expert} needs experts: set model.moe.num_experts")
        return
    if moe.top_k > moe.num_experts:
        raise RecipeError(f"model.moe.top_k = {moe.top_k} exceeds model.moe.num_experts = {moe.num_experts}")
    _require_divides("parallel.expert", p.expert, "model.moe.num_experts", moe.num_experts)
    if moe.first_dense_layers >= recipe.model.num_layers:
        raise RecipeError(f"model.moe.first_dense_layers = {moe.first_dense_layers} leaves no MoE layer in "
                          f"model.num_layers = {recipe.model.num_layers}")
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise RecipeError("model.moe.expert_bias = true needs model.moe.score_function = sigmoid, "
                          f"got {moe.score_function}")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise RecipeError("model.moe.pad_to_capacity = true needs model.moe.capacity_factor")
    if moe.top_k == 1 and moe.score_function == "softmax" and not moe.pre_softmax:
        raise RecipeError("model.moe.top_k = 1 with softmax scores needs model.moe.pre_softmax = true "
                          "(a softmax over one expert is constant: the router would get no gradient)")
    if p.tensor > 1 and not p.sequence_parallel:
        raise RecipeError(f"model.moe with parallel.tensor = {p.tensor} needs parallel.sequence_parallel = true "
                          "(megatron-core's MoE layer refuses tensor parallelism without it)")
    if moe.grouped_gemm and recipe.model.transformer_impl != "transformer_engine":
        raise RecipeError("model.moe.grouped_gemm = true needs model.transformer_impl = transformer_engine "
                          "(grouped GEMM experts come from transformer-engine)")
    expert_tensor = p.expert_tensor or p.tensor
    if recipe.model.add_bias_linear and moe.shared_expert_ffn_hidden_size is not None:
        raise RecipeError("model.add_bias_linear = true cannot be combined with "
                          "model.moe.shared_expert_ffn_hidden_size (megatron-core's shared experts have no biases)")
    if recipe.model.add_bias_linear and expert_tensor > 1:
        raise RecipeError(f"model.add_bias_linear = true with experts needs parallel.expert_tensor = 1, got "
                          f"{expert_tensor} (megatron-core supports expert biases only without expert tensor parallelism)")
    ffn = moe.ffn_hidden_size or recipe.model.ffn_hidden_size
    _require_divides("parallel.expert_tensor", expert_tensor, "model.moe.ffn_hidden_size", ffn)


def _check_parallel_flags(recipe: Recipe) -> None:
    p = recipe.parallel
    if p.sequence_parallel and p.tensor == 1:
        raise RecipeError("parallel.sequence_parallel = true requires parallel.tensor > 1, got parallel.tensor = 1")
    if p.virtual_pipeline is not None and p.virtual_pipeline > 1 and p.pipeline == 1:
        raise RecipeError(f"parallel.virtual_pipeline = {p.virtual_pipeline} requires parallel.pipeline > 1, "
                          f"got parallel.pipeline = 1")


def _check_schedule(recipe: Recipe) -> None:
    t, o = recipe.train, recipe.optimizer
    if t.global_batch_size % t.micro_batch_size:
        raise RecipeError(f"train.global_batch_size = {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size = {t.micro_batch_size}")
    if o.min_lr > o.lr:
        raise RecipeError(f"optimizer.min_lr = {o.min_lr} exceeds optimizer.lr = {o.lr}")
    if not all(0 <= b < 1 for b in o.betas):
        raise RecipeError(f"optimizer.betas must be two values in [0, 1), got {list(o.betas)}")
    if o.wsd_decay_steps is not None and o.decay != "wsd":
        raise RecipeError(f"optimizer.wsd_decay_steps is only used with optimizer.decay = wsd, "
                          f"got optimizer.decay = {o.decay}")
    if o.wsd_decay_steps is not None and o.decay_steps is not None and o.wsd_decay_steps > o.decay_steps:
        raise RecipeError(f"optimizer.wsd_decay_steps = {o.wsd_decay_steps} exceeds "
                          f"optimizer.decay_steps = {o.decay_steps}")


def parse_split(text: str) -> List[float]:
    """'98,1,1' -> [98.0, 1.0, 1.0] (missing shares are 0); RecipeError naming data.split otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or not all(math.isfinite(x) and x >= 0 for x in shares) or not shares[0] > 0:
        raise RecipeError(f"data.split must be 1 to 3 comma-separated non-negative shares "
                          f"(train,valid,test) with a positive train share, e.g. '98,1,1', got '{text}'")
    return shares + [0.0] * (3 - len(shares))


def _check_blend(key: str, blend: Optional[List[Tuple[float, str]]]) -> None:
    if blend is None:
        return
    if not blend:
        raise RecipeError(f"{key} is an empty list: give [[weight, prefix], ...] or null")
    for i, (weight, prefix) in enumerate(blend):
        if not (math.isfinite(weight) and weight > 0):
            raise RecipeError(f"{key}[{i}] ('{prefix}'): weight must be positive, got {weight}")
        if not prefix:
            raise RecipeError(f"{key}[{i}]: the dataset prefix is empty")


def _check_data(recipe: Recipe) -> None:
    d, t = recipe.data, recipe.train
    for single, many in (("path", "blend"), ("valid_path", "valid_blend")):
        if getattr(d, single) is not None and getattr(d, many) is not None:
            raise RecipeError(f"data.{single} and data.{many} are both set: use one (set the other to null)")
    _check_blend("data.blend", d.blend)
    _check_blend("data.valid_blend", d.valid_blend)
    shares = parse_split(d.split)
    separate_valid = d.valid_path is not None or d.valid_blend is not None
    if separate_valid and shares[1] > 0:
        raise RecipeError(f"data.split '{d.split}' gives a valid share and data.valid_path / valid_blend "
                          "is set too: use one source of validation data")
    if t.eval_interval and not separate_valid and shares[1] == 0:
        raise RecipeError(f"train.eval_interval = {t.eval_interval} needs validation data: give data.split a "
                          "valid share (e.g. '98,1,1') or set data.valid_path")
    if t.test_at_end and shares[2] == 0:
        raise RecipeError(f"train.test_at_end = true needs a test share in data.split (its third number, "
                          f"e.g. '98,1,1'), got '{d.split}'")
    if d.reset_attention_mask:
        raise RecipeError("data.reset_attention_mask = true is not supported: the model's attention is causal "
                          "over the whole packed sample and takes no per-document mask; set it to false")
    if d.reset_position_ids:
        raise RecipeError("data.reset_position_ids = true is not supported: megatron-core's GPTModel computes "
                          "RoPE from the position in the sample, never from position_ids; set it to false")


def validate_static(recipe: Recipe) -> None:
    """Checks that need no world size: ranges, choices, shapes vs. parallel sizes, batch and schedule."""
    _check_ranges(recipe)
    _check_model_shape(recipe)
    _check_parallel_flags(recipe)
    _check_moe(recipe)
    _check_schedule(recipe)
    _check_data(recipe)


def validate_for_world(recipe: Recipe, world_size: int) -> None:
    """Checks that need the number of ranks: the layout fits and the global batch splits evenly."""
    p, t = recipe.parallel, recipe.train
    if world_size < 1:
        raise RecipeError(f"world size must be positive, got {world_size}")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise RecipeError(f"parallel.tensor × parallel.pipeline × parallel.context = {model_parallel} "
                          f"does not divide the world size {world_size}")
    dp = recipe.data_parallel_size(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise RecipeError(f"train.global_batch_size = {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp} "
                          f"= {t.micro_batch_size * dp}")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.pipeline > 1 and micro_batches < p.pipeline:
        raise RecipeError(f"{micro_batches} micro-batches per step (train.global_batch_size / "
                          f"(micro_batch_size × data-parallel size)) are fewer than parallel.pipeline = "
                          f"{p.pipeline}: raise train.global_batch_size")
    if p.virtual_pipeline is not None and micro_batches % p.pipeline:
        raise RecipeError(f"{micro_batches} micro-batches per step are not a multiple of parallel.pipeline = "
                          f"{p.pipeline}, which the interleaved schedule (parallel.virtual_pipeline) needs")
    expert_tensor = p.expert_tensor or p.tensor
    expert_room = world_size // (expert_tensor * p.pipeline)
    if world_size % (expert_tensor * p.pipeline) or expert_room % p.expert:
        raise RecipeError(f"parallel.expert × parallel.expert_tensor = {p.expert} × {expert_tensor} does not "
                          f"divide the world size / parallel.pipeline = {world_size // p.pipeline}")


# ------------------------------------------------------------------------------------------- dumping


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """Plain nested dict (lists, not tuples) of every YAML key; `source` left out."""
    return {name: _plain(dataclasses.asdict(getattr(recipe, name))) for name in _yaml_fields(Recipe)}


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`betas: [0.9, 0.95]`), as recipes are written by hand."""


_RecipeDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def dump_recipe(recipe: Recipe) -> str:
    """The full recipe as YAML, in schema order; load_recipe reads it back to an equal recipe."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)
