"""A whole run's recipe: the sections put together, loaded from YAML, checked once.

Each section's dataclass lives with the code that owns it (model/config.py, parallel/config.py,
data/config.py, pretrain/optim.py, ...); the generic YAML machinery is common/schema.py. Checks
that need the world size are the layout's (parallel/layout.py) and the batch plan's
(data/loader.py); planning/setup.py:validate_for_world runs them with the one that spans both.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common import schema
from common.errors import RecipeError
from common.files import set_aside
from common.schema import NonNegativeFloat, NonNegativeInt, PositiveInt
from data.config import DataConfig, check_documents
from model.config import Fp8Config, ModelConfig, check_fp8, check_model
from parallel import tp_overlap
from parallel.config import ParallelConfig
from pretrain.checkpoint.config import CheckpointConfig
from pretrain.faults import DebugConfig, check_debug
from pretrain.metrics import LoggingConfig
from pretrain.optim import OptimizerConfig, check_offload
from pretrain.profiling import ProfileConfig

CompileTarget = Literal["layers", "mlp", "norms"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"


@dataclass
class TrainConfig:
    """How long, on what batches, in what numerics, and what to do when a step goes wrong."""

    steps: PositiveInt = 10  # optimizer steps
    global_batch_size: PositiveInt = 8  # samples per optimizer step, across data-parallel ranks
    micro_batch_size: PositiveInt = 2  # samples per forward/backward on one rank
    seed: NonNegativeInt = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: NonNegativeFloat = 1.0  # max global grad norm; 0 = no clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    # Fault guards (pretrain/guards.py). A step whose loss or gradients are not finite never updates
    # the model; `skip` drops the step (its batch and lr slot are still consumed) and goes on, `stop`
    # ends the run with exit code 3.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_skipped_steps: NonNegativeInt = 10  # skip: stop once more steps than this were skipped (resumes included)
    # Report rank, step and phase on stderr when one phase of a step (data, forward_backward,
    # optimizer, evaluation, logging, checkpoint) runs longer than this, and a hang report: which
    # collective the waiting ranks are in, which ranks never entered it and where those are
    # (<logging.dir>/watchdog/, docs/failures.md); seconds, 0 = no watchdog.
    watchdog_timeout_s: NonNegativeFloat = 0.0
    # Validation: every eval_interval optimizer steps (and after the last), the token-mean loss over
    # eval_steps global batches of the validation data, logged as val_loss and val_ppl. 0 = never.
    # The same validation samples each time, so successive val_loss values are comparable.
    eval_interval: NonNegativeInt = 0
    eval_steps: PositiveInt = 10  # global batches (of train.global_batch_size samples) per validation
    # After the last step, the same loss over eval_steps global batches of the test share of
    # data.split (its third number), logged as test_loss and test_ppl.
    test_at_end: bool = False
    # torch.compile of parts of every transformer layer: `layers` (each whole layer), or `mlp` (the
    # SwiGLU MLP: fuses the gate's activation and product) and/or `norms` (the RMSNorms). [] = eager.
    compile: list[CompileTarget] = field(default_factory=list)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def check(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise RecipeError(
                f"train.global_batch_size = {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size = {self.micro_batch_size}"
            )
        if "layers" in self.compile and len(self.compile) > 1:
            raise RecipeError(
                f"train.compile = {self.compile}: `layers` compiles each whole layer, its mlp and norms too"
            )
        self.profile.check()


@dataclass
class Recipe:
    """A whole run. Components receive their own section, never the whole recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)  # FP8 GEMMs (model/config.py, model/fp8/linear.py)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)  # fault injection (pretrain/faults.py)
    # Path of the recipe file it was loaded from; not a YAML key.
    source: str | None = field(default=None, metadata={"yaml": False})

    def log_dir(self) -> pathlib.Path:
        return pathlib.Path(self.logging.dir or f"runs/{self.logging.name}")

    def checkpoint_dir(self) -> pathlib.Path:
        return pathlib.Path(self.checkpoint.dir or self.log_dir() / "checkpoints")


def resolve_recipe_path(name_or_path: str) -> pathlib.Path:
    """An existing file as given; else recipes/NAME or recipes/NAME.yaml under the repo root."""
    found = schema.candidates(name_or_path, RECIPES_DIR)
    for path in found:
        if path.is_file():
            return path
    folder = pathlib.Path(name_or_path)
    if folder.is_dir():  # a run folder (logging.dir) holds the resolved recipe of its run
        hint = f": did you mean '{folder / 'recipe.yaml'}'?" if (folder / "recipe.yaml").is_file() else ""
        raise RecipeError(f"recipe '{name_or_path}' is a folder, not a recipe file{hint}")
    looked = ", ".join(schema.display(p) for p in found)
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(pathlib.Path(name_or_path).stem, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise RecipeError(f"recipe '{name_or_path}' not found: looked for {looked}; {hint}recipes: {', '.join(names)}")


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Recipe from a file (and its `base:` chain) plus `key.path=value` overrides, validated statically."""
    path = resolve_recipe_path(name_or_path)
    recipe = schema.load(Recipe, path, overrides, RECIPES_DIR)
    recipe.source = str(path)
    validate_static(recipe)
    return recipe


def validate_static(recipe: Recipe) -> None:
    """Checks that need no world size: bounds, choices, shapes vs. parallel sizes, batch and schedule."""
    schema.check_values(recipe)
    recipe.logging.check()
    check_model(recipe.model, recipe.parallel)
    tp_overlap.check_recipe(recipe.parallel.tp_comm_overlap, recipe.model.transformer_impl)
    check_fp8(recipe.fp8, recipe.model, recipe.parallel, recipe.train.precision)
    recipe.train.check()
    if recipe.parallel.fsdp is not None and recipe.train.precision == "fp16":
        # FSDP's parameters are the fp32 master weights, stepped by an optimizer without fp16's loss
        # scaling (megatron-core scales the loss only for fp16 parameters).
        raise RecipeError(
            f"parallel.fsdp = {recipe.parallel.fsdp} does not support train.precision = fp16 (no loss "
            f"scaling for fully sharded fp32 master weights): use bf16"
        )
    recipe.optimizer.check()
    check_offload(recipe.optimizer, recipe.parallel.fsdp, recipe.parallel.distributed_optimizer, recipe.train.precision)
    if recipe.optimizer.name == "muon":
        _check_muon(recipe)
    recipe.data.check(recipe.train.eval_interval, recipe.train.test_at_end)
    check_documents(recipe.data, recipe.model.transformer_impl, recipe.model.mtp_num_layers)
    check_debug(recipe.debug, recipe.train.watchdog_timeout_s)


def _check_muon(recipe: Recipe) -> None:
    """optimizer.name = muon against the other sections."""
    if recipe.parallel.distributed_optimizer and recipe.checkpoint.optimizer_format == "dp_reshardable":
        # megatron-core's flat format names Adam's two moments only
        raise RecipeError(
            "checkpoint.optimizer_format = dp_reshardable holds Adam's moments only, not Muon's momentum: "
            "use fully_reshardable with optimizer.name = muon"
        )
    moe = recipe.model.moe
    if moe.num_experts is not None and moe.grouped_gemm and recipe.model.transformer_impl == "transformer_engine":
        # transformer-engine's GroupedMLP keeps each expert's fc1 as a weightN that pretrain/muon.py
        # does not split [gate; up] (our own grouped experts' stacks it does, expert by expert)
        raise RecipeError(
            "optimizer.name = muon with model.moe.grouped_gemm = true is not built for model.transformer_impl = "
            "transformer_engine (its per-expert fc1 weights are not split [gate; up]); set model.transformer_impl = "
            "local or model.moe.grouped_gemm = false"
        )


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of every YAML key; `source` left out."""
    return schema.to_dict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The full recipe as YAML, in schema order; load_recipe reads it back to an equal recipe."""
    return schema.dump(recipe)


def model_config_from_dict(tree: dict[str, Any], where: str) -> ModelConfig:
    """A `model:` section (e.g. the recipe stored in a checkpoint) checked against the schema."""
    return schema.from_dict(ModelConfig, tree, "model", where)


def check_output_dirs(recipe: Recipe) -> None:
    """The folders a run writes (logging.dir, the checkpoint folder when it saves, data.cache_dir)
    can be created and written, checked before anything is built (and without creating them), so
    one that cannot is a one-line error naming its key, not a failure deep in a save."""
    cache = pathlib.Path(recipe.data.cache_dir or recipe.log_dir() / "data_cache")
    dirs = [("logging.dir", recipe.log_dir()), ("data.cache_dir", cache)]
    if recipe.checkpoint.save:
        dirs.append(("checkpoint.dir", recipe.checkpoint_dir()))
    for key, path in dirs:
        existing = path.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise RecipeError(f"{key} '{path}' cannot be created: '{existing}' is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RecipeError(f"{key} '{path}' cannot be written: '{existing}' is not writable")


def _without_source(text: str) -> str:
    return text.split("\n", 1)[-1] if text.startswith("# resolved from ") else text


def write_recipe(recipe: Recipe, path: pathlib.Path) -> None:
    """The resolved recipe (every key) to `path`, atomically: `--recipe path` repeats the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    source = f"# resolved from {recipe.source}\n" if recipe.source else ""
    text = source + dump_recipe(recipe)
    # A restart with other overrides keeps the earlier recipe (the `# resolved from` line may differ).
    if path.is_file() and _without_source(path.read_text(errors="replace")) != _without_source(text):
        kept = set_aside(path)
        print(f"{path} differs from this run's recipe: the earlier one is kept as {kept}", flush=True)
    tmp.write_text(text)
    tmp.replace(path)
