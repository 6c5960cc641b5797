"""The layout search behind `python -m tools.plan_layout` (tools/plan_layout.py): it lists the layouts (tensor, pipeline, virtual, context, expert, data, recompute, micro-batch) whose
worst rank fits, fastest first by the analytic step time (planning/step_time.py), and prints the best
as recipe overrides, with a Chinchilla back-of-envelope for the recipe's model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError
from model.config import check_model
from model.gpt import parameter_counts
from planning.memory import Setup, Target, estimate_setup, setup_for
from planning.report import aligned, recompute_candidates, reserve_bytes, significant
from planning.step_time import step_time

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022, compute-optimal training
MICRO_BATCHES = (1, 2, 4, 8)
CONTEXTS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
    overrides: dict[str, Any]  # recipe keys -> values
    setup: Any  # planning.memory.Setup
    time: Any  # planning.step_time.StepTime
    needed: int = 0  # worst peak plus the device reserve; 0 until estimated


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _recomputes(recipe: Recipe, cache: dict[tuple, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A short ladder of recompute settings, cheapest first (the planner's, not the dry run's search);
    which are valid depends only on the layers per model chunk, so `cache` keeps them per split."""
    p = recipe.parallel
    key = (p.pipeline, p.virtual_pipeline, p.first_stage_layers, p.last_stage_layers)
    if key in cache:
        return cache[key]
    wanted = [
        {"recompute_granularity": None},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]},
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "layernorm"]},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "mlp"]},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "moe_act"]},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "moe"]},
        {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    ]
    possible = recompute_candidates(recipe)
    cache[key] = [w for w in wanted if w in possible]
    return cache[key]


def layouts(recipe: Recipe, gpus: int, gpu_per_node: int) -> Iterator[dict[str, Any]]:
    """Every parallel layout of `gpus` ranks the recipe's shapes allow (as recipe overrides)."""
    m, t = recipe.model, recipe.train
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    tensors = [d for d in _divisors(gpus) if d <= gpu_per_node and heads % d == 0 and groups % d == 0]
    experts = _divisors(m.moe.num_experts) if m.moe.num_experts else [1]
    for tp in tensors:
        for pp in (d for d in _divisors(gpus // tp) if d <= m.num_layers):
            for cp in (c for c in CONTEXTS if gpus % (tp * pp * c) == 0 and m.seq_length % (2 * c) == 0):
                dp = gpus // (tp * pp * cp)
                for vpp, first, last in _pipeline_splits(m.num_layers, pp):
                    for ep, etp in _expert_layouts(experts, tp, gpus // pp):
                        for fsdp, shard in _shardings(
                            recipe, pp, dp * cp, gpu_per_node // tp if gpu_per_node % tp == 0 else 0
                        ):
                            for mbs in (b for b in MICRO_BATCHES if t.global_batch_size % (b * dp) == 0):
                                yield {
                                    "parallel.tensor": tp,
                                    "parallel.pipeline": pp,
                                    "parallel.virtual_pipeline": vpp,
                                    "parallel.first_stage_layers": first,
                                    "parallel.last_stage_layers": last,
                                    "parallel.context": cp,
                                    "parallel.expert": ep,
                                    "parallel.expert_tensor": etp,
                                    "parallel.sequence_parallel": tp > 1,
                                    "parallel.distributed_optimizer": dp * cp > 1 and fsdp is None,
                                    "parallel.fsdp": fsdp,
                                    "parallel.fsdp_shard_size": shard,
                                    "train.micro_batch_size": mbs,
                                }


def _pipeline_splits(layers: int, pp: int) -> list[tuple[int | None, int | None, int | None]]:
    """(virtual_pipeline, first_stage_layers, last_stage_layers): even stages, with every virtual
    size that divides them, where pp divides the layers; and first and last stages up to two layers
    lighter than the middle ones (megatron-core's num_layers_in_first/last_pipeline_stage: room for
    the embedding, and for the output layer and loss, as Megatron-Bridge's
    account_for_embedding/loss_in_pipeline_split make). Uneven stages with virtual pipelining:
    this project refuses the combination (parallel/config.py:check_uneven_pipeline)."""
    splits: list[tuple[int | None, int | None, int | None]] = []
    if layers % pp == 0:
        splits += [(None, None, None)] + [(v, None, None) for v in _divisors(layers // pp) if v > 1 and pp > 1]
    if pp == 2:
        half = layers // 2
        splits += [(None, f, layers - f) for f in range(max(half - 1, 1), half + 2) if 2 * f != layers < 2 * f + 4]
    elif pp > 2:
        for middle in range(-(-layers // pp), -(-layers // pp) + 2):
            for first in range(max(middle - 2, 1), middle + 1):
                last = layers - first - middle * (pp - 2)
                if middle - 2 <= last <= middle and last >= 1 and not first == last == middle:
                    splits.append((None, first, last))
    return splits


def _expert_layouts(experts: list[int], tp: int, stage_ranks: int) -> Iterator[tuple[int, int | None]]:
    """(expert, expert_tensor) sizes: each expert whole on a rank (expert_tensor 1) or split like the
    dense layers (null = tensor); expert × expert_tensor ranks must divide a stage's ranks."""
    for ep in experts:
        for etp in sorted({tp, 1}) if len(experts) > 1 or ep > 1 else [tp]:
            if stage_ranks % (ep * etp) == 0:
                yield ep, (None if etp == tp else etp)


def _shardings(recipe: Recipe, pp: int, dp: int, node: int) -> list[tuple[str | None, int | None]]:
    """(parallel.fsdp, parallel.fsdp_shard_size): None (the distributed optimizer) and, where the
    recipe's layers run under it, FSDP over the data × context ranks: zero3 (weights gathered per
    layer, twice a micro-batch) and zero2 (weights kept gathered from the forward to the backward:
    one gather, more memory) (no pipeline: FSDP's per-layer gathers and a pipeline schedule's
    in-flight micro-batches are not searched together; transformer-engine layers: not verified).
    HSDP for dense models (the recipe checks refuse it with MoE) where the data × context ranks
    span nodes: both, sharded within one node (`node` data × context ranks: NVLink for the
    per-micro-batch gathers and reduce-scatters) and replicated across nodes (one all-reduce of the
    gradient shards a step). Other shard sizes are not tried: smaller ones hold more state and
    all-reduce more, larger ones put the gathers on the network as plain FSDP does and add the
    all-reduce: slower than plain FSDP and no smaller."""
    if dp == 1 or pp > 1 or recipe.model.transformer_impl != "local":
        return [(None, None)]
    found: list[tuple[str | None, int | None]] = [(None, None), ("zero3", None), ("zero2", None)]
    if recipe.model.moe.num_experts is None and 1 < node < dp and dp % node == 0:
        found += [("zero3", node), ("zero2", node)]
    return found


def no_layout(recipe: Recipe, gpus: int, gpu_per_node: int) -> str:
    """Why `layouts` yields nothing (or nothing that passes the model's checks) for `gpus` GPUs."""
    m, t = recipe.model, recipe.train
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    data_sizes = sorted(
        {
            gpus // (tp * pp * cp)
            for tp in _divisors(gpus)
            if tp <= gpu_per_node and heads % tp == 0 and groups % tp == 0
            for pp in _divisors(gpus // tp)
            if pp <= m.num_layers
            for cp in CONTEXTS
            if gpus % (tp * pp * cp) == 0 and m.seq_length % (2 * cp) == 0
        }
    )
    return (
        f"no parallel layout of {gpus} GPUs exists for {recipe.source}: tensor must divide the {heads} heads, "
        f"{groups} query groups and {gpu_per_node} GPUs per node, pipeline at most the {m.num_layers} layers, and the "
        f"data-parallel size that leaves ({', '.join(map(str, data_sizes))}) must divide "
        f"train.global_batch_size {t.global_batch_size}: use another --gpus"
    )


def _apply(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        recipe, **{s: dataclasses.replace(getattr(recipe, s), **fields) for s, fields in sections.items()}
    )


def candidates(recipe: Recipe, gpus: int, gpu: Any, vocab: int) -> list[Candidate]:
    """Every valid (layout, recompute) with its step time, fastest first."""
    target = Target.for_device("cuda", recipe.model.transformer_impl)
    out: list[Candidate] = []
    cache: dict[tuple, list[dict[str, Any]]] = {}
    for layout in layouts(recipe, gpus, gpu.gpus_per_node):
        base = _apply(recipe, layout)
        for fields in _recomputes(base, cache):
            planned = _apply(base, {f"model.{k}": v for k, v in _recompute_fields(fields).items()})
            try:
                check_model(planned.model, planned.parallel)
                setup = setup_for(planned, gpus, target, vocab, gpu.gpus_per_node)
            except RecipeError:
                continue
            overrides = layout | {f"model.{k}": v for k, v in fields.items()}
            out.append(Candidate(overrides, setup, step_time(setup, gpu)))
            out.extend(_with_tp_overlap(overrides, setup, gpu))
    return sorted(out, key=lambda c: c.time.total)


def _with_tp_overlap(overrides: dict[str, Any], setup: Setup, gpu: Any) -> list[Candidate]:
    """The same layout with transformer-engine's userbuffers (parallel.tp_comm_overlap), where they
    apply: tensor > 1 with sequence parallelism and transformer-engine layers. The setup is reused
    with the flag set: the step time chunks the collectives, the memory adds the userbuffers."""
    recipe = setup.recipe
    if recipe.model.transformer_impl != "transformer_engine" or not recipe.parallel.sequence_parallel:
        return []
    overlapped = _apply(recipe, {"parallel.tp_comm_overlap": True})
    layout = dataclasses.replace(setup.layout, tp_comm_overlap=True)
    planned = dataclasses.replace(setup, recipe=overlapped, layout=layout)
    return [Candidate(overrides | {"parallel.tp_comm_overlap": True}, planned, step_time(planned, gpu))]


def _recompute_fields(fields: dict[str, Any]) -> dict[str, Any]:
    unset = {"recompute_granularity": None, "recompute_modules": None, "recompute_method": None}
    return unset | {"recompute_num_layers": None} | fields


def fitting(ordered: list[Candidate], gpu_bytes: int, top: int) -> tuple[list[Candidate], int]:
    """The first `top` candidates (fastest first) whose worst rank fits; how many were estimated."""
    found, tried = [], 0
    for c in ordered:
        tried += 1
        worst = estimate_setup(c.setup).worst
        needed = worst.peak + reserve_bytes(worst, c.setup.target)
        if needed <= gpu_bytes:
            found.append(dataclasses.replace(c, needed=needed))
            if len(found) == top:
                break
    return found, tried


# ------------------------------------------------------------------------------------------ output


def _recompute_text(overrides: dict[str, Any]) -> str:
    granularity = overrides.get("model.recompute_granularity")
    if granularity is None:
        return "none"
    if granularity == "selective":
        return "selective " + ",".join(overrides["model.recompute_modules"])
    return f"full {overrides['model.recompute_method']} {overrides['model.recompute_num_layers']}"


def _expert_text(o: dict[str, Any]) -> str:
    """expert size, and /expert_tensor where experts split otherwise than the dense layers."""
    etp = o.get("parallel.expert_tensor")
    return f"{o['parallel.expert']}" + (f"/{etp}" if etp is not None else "")


def _pipeline_text(o: dict[str, Any]) -> str:
    """pipeline size, and first/last stage layers where they differ from the middle stages'."""
    first, last = o.get("parallel.first_stage_layers"), o.get("parallel.last_stage_layers")
    return f"{o['parallel.pipeline']}" + (f" {first}/{last}" if first is not None else "")


def _tensor_text(o: dict[str, Any]) -> str:
    return f"{o['parallel.tensor']}" + (" ub" if o.get("parallel.tp_comm_overlap") else "")


def _data_text(o: dict[str, Any], data: int) -> str:
    """data size, z3 / z2 under FSDP, and /N under HSDP (shard groups of N data × context ranks)."""
    shard = o.get("parallel.fsdp_shard_size")
    sharding = {"zero3": " z3", "zero2": " z2"}.get(o.get("parallel.fsdp") or "", "")
    return f"{data}{sharding}" + (f"/{shard}" if shard is not None else "")


TABLE_HEAD = ["#", "tensor", "pipeline", "virtual", "context", "expert", "data", "recompute", "micro", "needed GiB"]
TABLE_HEAD += ["step s", "MFU %"]


def table(found: list[Candidate], gpu: Any, gpus: int) -> list[str]:
    """The fitting layouts, one row each, every column as wide as its longest entry."""
    rows = [TABLE_HEAD]
    for i, c in enumerate(found, 1):
        o, layout = c.overrides, c.setup.layout
        mfu = c.time.mfu(gpu, c.setup.recipe.train.precision, gpus)
        rows.append(
            [f"{i}", _tensor_text(o), _pipeline_text(o), f"{o['parallel.virtual_pipeline'] or '-'}"]
            + [f"{o['parallel.context']}", _expert_text(o), _data_text(o, layout.data), _recompute_text(o)]
            + [
                f"{o['train.micro_batch_size']}",
                f"{c.needed / 2**30:.1f}",
                significant(c.time.total),
                f"{100 * mfu:.1f}",
            ]
        )
    return aligned(rows, left=frozenset({TABLE_HEAD.index("recompute")}))


def as_overrides(overrides: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return f"[{','.join(v)}]"
        return str(v)

    return " ".join(f"{k}={text(v)}" for k, v in overrides.items())


def chinchilla(recipe: Recipe, vocab: int, best: Candidate) -> list[str]:
    """Hoffmann et al. 2022: about 20 tokens per parameter (active parameters for MoE)."""
    counts = parameter_counts(recipe.model, vocab)
    params = counts.active
    tokens = CHINCHILLA_TOKENS_PER_PARAMETER * params
    per_step = recipe.train.global_batch_size * recipe.model.seq_length
    steps = -(-tokens // per_step)
    days = steps * best.time.total / 86400
    kind = "active " if counts.active != counts.total else ""
    return [
        f"Chinchilla (Hoffmann et al. 2022, ~{CHINCHILLA_TOKENS_PER_PARAMETER} tokens per parameter): "
        f"{params / 1e9:.2f}B {kind}parameters -> {tokens / 1e12:.2f}T tokens = {steps:,} steps of "
        f"{recipe.train.global_batch_size} x {recipe.model.seq_length} tokens; "
        f"{days:.1f} days at the best layout's {best.time.total:.2f} s per step",
    ]
