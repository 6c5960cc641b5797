"""The whole recipe (pretrain/recipe.py): names and paths, the static checks across sections and
their messages, the shipped recipes."""

import re

import pytest

from common.errors import RecipeError, UserError
from planning.setup import validate_for_world
from pretrain.recipe import RECIPES_DIR, Recipe, load_recipe, resolve_recipe_path, validate_static
from tests.helpers.recipes import error_of, in_tmp, write  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

# ---------------------------------------------------------------------------------- name resolution


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_gpt.yaml", str(RECIPES_DIR / "tiny_gpt.yaml")])
def test_resolve_by_name_or_path_independent_of_cwd(name):
    assert resolve_recipe_path(name) == RECIPES_DIR / "tiny_gpt.yaml"


def test_existing_path_wins_over_recipes_folder(tmp_path):
    write(tmp_path, "tiny_gpt.yaml", "train: {steps: 3}\n")
    assert load_recipe("tiny_gpt.yaml").train.steps == 3
    assert load_recipe("tiny_gpt").train.steps == 30


def test_recipe_not_found():
    listed = "recipes: deepseek_moe_16b, deepseek_v3, llama70b, llama_1b, llama_3b, mixtral_8x7b, qwen3_30b_a3b, tiny_deepseek, tiny_gpt, tiny_moe, tiny_qwen3_moe"
    assert error_of("nope") == (
        f"recipe 'nope' not found: looked for nope, {RECIPES_DIR}/nope, {RECIPES_DIR}/nope.yaml; {listed}"
    )
    assert error_of("nope.yaml") == (
        f"recipe 'nope.yaml' not found: looked for nope.yaml, {RECIPES_DIR}/nope.yaml; {listed}"
    )
    assert error_of("tiny-moe").endswith(f"did you mean 'tiny_moe'? {listed}")


def test_recipe_error_is_a_user_error():
    with pytest.raises(UserError):
        load_recipe("nope")


# -------------------------------------------------------------------------------- static validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_layers=0"], "model.num_layers must be positive, got 0"),
        (["model.vocab_size=-5"], "model.vocab_size must be positive, got -5"),
        (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline must be positive, got 0"),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be positive, got 0"),
        (["optimizer.lr=0"], "optimizer.lr must be positive, got 0.0"),
        (["data.num_workers=-1"], "data.num_workers must be non-negative, got -1"),
        (["train.grad_clip=-1"], "train.grad_clip must be non-negative, got -1.0"),
        (["model.hidden_dropout=1"], "model.hidden_dropout must be in [0, 1), got 1.0"),
        (["train.precision=fp64"], "train.precision must be one of fp32 | bf16 | fp16, got 'fp64'"),
        (["optimizer.decay=step"], "optimizer.decay must be one of cosine | linear | wsd | constant, got 'step'"),
        (["model.transformer_impl=te"], "model.transformer_impl must be one of local | transformer_engine, got 'te'"),
        (["logging.wandb.mode=off"], "logging.wandb.mode must be one of online | offline | disabled, got 'off'"),
        (["train.device=tpu"], "train.device must be one of auto | cpu | cuda, got 'tpu'"),
        (["logging.name=a/b"], "logging.name must be a non-empty name without '/', got 'a/b'"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite must be one of skip | stop, got 'ignore'"),
        (["train.max_skipped_steps=-1"], "train.max_skipped_steps must be non-negative, got -1"),
        (["train.watchdog_timeout_s=-2"], "train.watchdog_timeout_s must be non-negative, got -2.0"),
        (["debug.nan_loss_at_step=0"], "debug.nan_loss_at_step must be positive, got 0"),
        (["debug.stall_s=-1"], "debug.stall_s must be non-negative, got -1.0"),
        (["model.num_attention_heads=3"], "model.num_attention_heads = 3 does not divide model.hidden_size = 64"),
        (["model.num_query_groups=3"], "model.num_query_groups = 3 does not divide model.num_attention_heads = 4"),
        (["parallel.tensor=8"], "parallel.tensor = 8 does not divide model.num_attention_heads = 4"),
        (["parallel.tensor=4"], "parallel.tensor = 4 does not divide model.num_query_groups = 2"),
        (["parallel.pipeline=3"], "parallel.pipeline = 3 does not divide model.num_layers = 4"),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=3"],
            "parallel.pipeline × parallel.virtual_pipeline = 6 does not divide model.num_layers = 4",
        ),
        (["parallel.context=3"], "2 × parallel.context = 6 does not divide model.seq_length = 128"),
        (
            ["parallel.context_comm=ring"],
            "parallel.context_comm must be one of p2p | a2a | a2a+p2p | all_gather, got 'ring'",
        ),
        (
            ["parallel.context=2", "parallel.context_comm=all_gather"],
            "parallel.context_comm = all_gather needs model.transformer_impl = transformer_engine; the local layers "
            "do p2p, a2a and a2a+p2p",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a", "model.transformer_impl=transformer_engine"],
            "parallel.tensor × parallel.context = 4 does not divide model.num_query_groups = 2",
        ),
        (
            ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_length=5"],
            "parallel.tensor = 2 does not divide model.seq_length / parallel.context = 5",
        ),
        (
            ["parallel.sequence_parallel=true"],
            "parallel.sequence_parallel = true requires parallel.tensor > 1, got parallel.tensor = 1",
        ),
        (
            ["parallel.virtual_pipeline=2"],
            "parallel.virtual_pipeline = 2 requires parallel.pipeline > 1, got parallel.pipeline = 1",
        ),
        (["train.global_batch_size=7"], "train.global_batch_size = 7 is not a multiple of train.micro_batch_size = 2"),
        (["optimizer.min_lr=0.01"], "optimizer.min_lr = 0.01 exceeds optimizer.lr = 0.003"),
        (["optimizer.betas=[0.9,1.0]"], "optimizer.betas must be two values in [0, 1), got [0.9, 1.0]"),
        (
            ["optimizer.wsd_decay_steps=5"],
            "optimizer.wsd_decay_steps is only used with optimizer.decay = wsd, got optimizer.decay = cosine",
        ),
        (
            ["optimizer.decay=wsd", "optimizer.decay_steps=10", "optimizer.wsd_decay_steps=20"],
            "optimizer.wsd_decay_steps = 20 exceeds optimizer.decay_steps = 10",
        ),
        (["train.eval_steps=0"], "train.eval_steps must be positive, got 0"),
        (
            ["train.test_at_end=true"],
            "train.test_at_end = true needs a test share in data.split (its third number, e.g. '98,1,1'), got '100,0,0'",
        ),
        (["data.blend=[[1, a]]"], "data.path and data.blend are both set: use one (set the other to null)"),
        (["data.path=null", "data.blend=[[0.5, a], [0, b]]"], "data.blend[1] ('b'): weight must be positive, got 0.0"),
        (["data.path=null", "data.blend=[[-1, a]]"], "data.blend[0] ('a'): weight must be positive, got -1.0"),
        (["data.path=null", "data.blend=[]"], "data.blend is an empty list: give [[weight, prefix], ...] or null"),
        (["data.valid_blend=[[0, v]]"], "data.valid_blend[0] ('v'): weight must be positive, got 0.0"),
        (
            ["data.split=98;1;1"],
            "data.split must be 1 to 3 comma-separated non-negative shares (train,valid,test) "
            "with a positive train share, e.g. '98,1,1', got '98;1;1'",
        ),
        (
            ["data.split=0,1,0"],
            "data.split must be 1 to 3 comma-separated non-negative shares (train,valid,test) "
            "with a positive train share, e.g. '98,1,1', got '0,1,0'",
        ),
        (
            ["data.split=98,2", "data.valid_path=v"],
            "data.split '98,2' gives a valid share and data.valid_path / "
            "valid_blend is set too: use one source of validation data",
        ),
        (
            ["train.eval_interval=5"],
            "train.eval_interval = 5 needs validation data: give data.split a valid share "
            "(e.g. '98,1,1') or set data.valid_path",
        ),
        (
            ["data.reset_attention_mask=true", "model.transformer_impl=transformer_engine"],
            "data.reset_attention_mask = true needs model.transformer_impl = local (transformer-engine's "
            "attention takes documents only in its THD format, which is not wired here)",
        ),
        (["parallel.fsdp=zero1"], "parallel.fsdp must be one of zero2 | zero3, got 'zero1'"),
        (
            ["parallel.fsdp=zero3", "parallel.distributed_optimizer=true"],
            "parallel.fsdp = zero3 shards the optimizer state itself: set parallel.distributed_optimizer = false",
        ),
        (
            ["parallel.fsdp=zero2", "model.transformer_impl=transformer_engine"],
            "parallel.fsdp = zero2 is verified with model.transformer_impl = local only (got transformer_engine): "
            "transformer-engine layers under FSDP2 are not yet checked",
        ),
        (
            ["parallel.fsdp=zero3", "train.precision=fp16"],
            "parallel.fsdp = zero3 does not support train.precision = fp16 (no loss scaling for fully sharded "
            "fp32 master weights): use bf16",
        ),
        (
            ["parallel.fsdp=zero3", "parallel.overlap_grad_reduce=true", "parallel.bucket_size=1000"],
            "parallel.fsdp = zero3 overlaps its own all-gathers and reduce-scatters (torch FSDP2 prefetching): "
            "leave parallel.overlap_grad_reduce, parallel.bucket_size null",
        ),
        (
            ["parallel.overlap_param_gather=true"],
            "parallel.overlap_param_gather = true needs parallel.distributed_optimizer = true: without it every "
            "data-parallel rank updates whole weights and there is nothing to gather",
        ),
        (
            ["parallel.overlap_grad_reduce=false", "parallel.bucket_size=1000"],
            "parallel.bucket_size = 1000 is only read with parallel.overlap_grad_reduce: without overlap "
            "megatron-core reduces each model chunk's gradients in one bucket",
        ),
        (
            ["parallel.pipeline=2", "parallel.overlap_p2p_comm=true"],
            "parallel.overlap_p2p_comm = true: megatron-core overlaps pipeline sends and receives in the "
            "interleaved schedule only; set parallel.virtual_pipeline > 1 or leave overlap_p2p_comm null",
        ),
        (
            ["model.recompute_granularity=full"],
            "model.recompute_granularity = full needs model.recompute_method (uniform | block) and "
            "model.recompute_num_layers",
        ),
        (
            ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=3"],
            "model.recompute_num_layers = 3 does not divide the 4 layers of a model chunk "
            "(recompute_method = uniform checkpoints groups of that many layers)",
        ),
        (
            [
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=3",
                "parallel.pipeline=2",
            ],
            "model.recompute_num_layers = 3 exceeds the 2 layers of a model chunk "
            "(a pipeline stage, or one virtual stage of it)",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
            "model.recompute_num_layers is only used with model.recompute_granularity = full, got selective",
        ),
        (
            ["model.recompute_modules=[mlp]"],
            "model.recompute_modules is only used with model.recompute_granularity = selective, got null",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn, mla_mixer]"],
            "model.recompute_modules[1] must be one of core_attn | layernorm | mlp | moe | moe_act | "
            "shared_experts | mla_up_proj, got 'mla_mixer'",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[]"],
            "model.recompute_modules is empty: name at least one module, or set recompute_granularity",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[mlp, mlp]"],
            "model.recompute_modules lists a module twice: ['mlp', 'mlp']",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
            "model.recompute_modules: moe has nothing to recompute: the model has no MoE layer",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[mlp]", "model.moe.num_experts=4"],
            "model.recompute_modules: mlp has nothing to recompute: the model has no dense layer "
            "(every layer is MoE: use moe)",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[moe_act]", "model.moe.num_experts=4"],
            "model.recompute_modules: moe_act has nothing to recompute: the model has no grouped-GEMM experts "
            "(megatron-core recomputes the activation only there)",
        ),
        (
            [
                "model.recompute_granularity=selective",
                "model.recompute_modules=[shared_experts]",
                "model.moe.num_experts=4",
            ],
            "model.recompute_modules: shared_experts has nothing to recompute: the model has no shared experts "
            "(model.moe.shared_expert_ffn_hidden_size)",
        ),
        (
            [
                "model.recompute_granularity=selective",
                "model.recompute_modules=[layernorm]",
                "model.transformer_impl=transformer_engine",
            ],
            "model.recompute_modules: layernorm has nothing to recompute: the model has no separate norm with "
            "model.transformer_impl = transformer_engine (its norms are fused into the dense layers' linears)",
        ),
    ],
)
def test_static_validation_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


def test_data_blend_and_split_keys():
    r = load_recipe(
        "tiny_gpt", ["data.path=null", "data.blend=[[0.7, a], [3, b]]", "data.split=98,1,1", "train.eval_interval=10"]
    )
    assert r.data.blend == [(0.7, "a"), (3.0, "b")] and r.data.split == "98,1,1"
    assert load_recipe("tiny_gpt", ["data.valid_path=v", "train.eval_interval=1"]).data.valid_path == "v"
    assert error_of("tiny_gpt", ["data.path=null", "data.blend=[a, b]"]) == (
        "wrong type for 'data.blend' on the command line: expected a list, each item a list "
        "[a number, a string] or null, got a list of 2 items"
    )


def test_valid_layouts_pass():
    load_recipe(
        "tiny_gpt",
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "parallel.context=2",
        ],
    )
    load_recipe("tiny_gpt", ["model.num_query_groups=null", "parallel.tensor=4"])
    load_recipe("tiny_gpt", ["optimizer.decay=wsd", "optimizer.wsd_decay_steps=5", "model.seq_length=127"])


def test_validate_static_on_a_built_recipe():
    r = Recipe()
    validate_static(r)
    r.train.precision = "int8"
    with pytest.raises(RecipeError, match=re.escape("train.precision must be one of fp32 | bf16 | fp16")):
        validate_static(r)


# ---------------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_shipped_recipes_load_and_validate(name):
    r = load_recipe(name)
    validate_static(r)
    assert r.source == str(RECIPES_DIR / f"{name}.yaml")


@pytest.mark.parametrize("name, published", [("llama_1b", 1_235_814_400), ("llama_3b", 3_212_749_824)])
def test_llama_3_2_recipes_have_the_published_parameter_counts(name, published):
    """Llama-3.2-1B and -3B (tied embeddings): 1.24B and 3.21B parameters."""
    from model.gpt import parameter_counts

    model = load_recipe(name).model
    assert parameter_counts(model, model.vocab_size).total == published


def test_tiny_gpt_values():
    r = load_recipe("tiny_gpt")
    m = r.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        4,
        64,
        176,
        4,
        2,
    )
    assert (m.vocab_size, r.data.tokenizer, r.train.device) == (None, "byte", "auto")
    assert (r.optimizer.lr, r.optimizer.min_lr, r.optimizer.warmup_steps) == (3e-3, 3e-4, 5)
    validate_for_world(r, 1)
    validate_for_world(r, 4)


def test_llama70b_values_and_world():
    r = load_recipe("llama70b")
    m, p = r.model, r.parallel
    assert (
        m.num_layers,
        m.hidden_size,
        m.ffn_hidden_size,
        m.num_attention_heads,
        m.num_query_groups,
        m.vocab_size,
        m.seq_length,
        m.rotary_base,
    ) == (80, 8192, 28672, 64, 8, 128256, 8192, 500000.0)
    assert (p.tensor, p.pipeline, p.virtual_pipeline, p.context) == (8, 4, 5, 2)
    layout, plan = validate_for_world(r, 512)
    assert (layout.data, plan.micro_batches) == (8, 64)
