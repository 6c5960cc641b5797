"""Recipe loading: precedence, `base:` chains, overrides, type checks and every validation message."""

import json
import re
import textwrap

import pytest

from common.errors import RecipeError, UserError
from pretrain.recipe import (
    RECIPES_DIR,
    Recipe,
    dump_recipe,
    load_recipe,
    recipe_to_dict,
    resolve_recipe_path,
    validate_for_world,
    validate_static,
)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run every test from tmp_path, so files written there display as bare names in messages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def error_of(name, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(name, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------- precedence


def test_precedence_defaults_base_recipe_cli(tmp_path):
    write(
        tmp_path,
        "base.yaml",
        """
        model: {num_layers: 8, hidden_size: 128}
        train: {steps: 20, seed: 7}
    """,
    )
    write(
        tmp_path,
        "child.yaml",
        """
        base: base.yaml
        model: {hidden_size: 256}
        train: {steps: 30}
    """,
    )
    r = load_recipe("child.yaml", ["train.steps=40"])
    assert r.model.ffn_hidden_size == 176  # default
    assert r.model.num_layers == 8  # base
    assert r.train.seed == 7  # base, beside a recipe key of the same section
    assert r.model.hidden_size == 256  # recipe over base
    assert r.train.steps == 40  # command line over recipe


def test_deep_merge_keeps_siblings_and_lists_replace(tmp_path):
    write(
        tmp_path,
        "base.yaml",
        """
        logging: {wandb: {project: p1, mode: online}}
        optimizer: {betas: [0.8, 0.9]}
    """,
    )
    write(
        tmp_path,
        "child.yaml",
        """
        base: base.yaml
        logging: {wandb: {mode: disabled}}
        optimizer: {betas: [0.7, 0.75]}
    """,
    )
    r = load_recipe("child.yaml")
    assert (r.logging.wandb.project, r.logging.wandb.mode) == ("p1", "disabled")
    assert r.optimizer.betas == (0.7, 0.75)


def test_later_override_wins():
    r = load_recipe("tiny_gpt", ["train.steps=11", "train.steps=12"])
    assert r.train.steps == 12


def test_empty_recipe_is_the_defaults(tmp_path):
    write(tmp_path, "empty.yaml", "# nothing\n")
    r = load_recipe("empty.yaml")
    assert recipe_to_dict(r) == recipe_to_dict(Recipe())
    assert r.source == "empty.yaml"


# ------------------------------------------------------------------------------------- name resolution


@pytest.mark.parametrize("name", ["tiny_gpt", "tiny_gpt.yaml", str(RECIPES_DIR / "tiny_gpt.yaml")])
def test_resolve_by_name_or_path_independent_of_cwd(name):
    assert resolve_recipe_path(name) == RECIPES_DIR / "tiny_gpt.yaml"


def test_existing_path_wins_over_recipes_folder(tmp_path):
    write(tmp_path, "tiny_gpt.yaml", "train: {steps: 3}\n")
    assert load_recipe("tiny_gpt.yaml").train.steps == 3
    assert load_recipe("tiny_gpt").train.steps == 30


def test_recipe_not_found():
    listed = "recipes: deepseek_moe_16b, llama70b, llama_1b, llama_3b, mixtral_8x7b, tiny_gpt, tiny_moe"
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


# ---------------------------------------------------------------------------------------- base chains


def test_base_chain_relative_to_own_folder(tmp_path):
    write(tmp_path, "sub/root.yaml", "train: {steps: 5, seed: 1}\nlogging: {name: root}\n")
    write(tmp_path, "sub/mid.yaml", "base: root.yaml\ntrain: {steps: 6}\n")
    write(tmp_path, "top.yaml", "base: sub/mid.yaml\nlogging: {name: top}\n")
    r = load_recipe("top.yaml")
    assert (r.train.steps, r.train.seed, r.logging.name) == (6, 1, "top")


def test_base_by_recipe_name(tmp_path):
    write(tmp_path, "mine.yaml", "base: tiny_gpt\ntrain: {steps: 7}\n")
    r = load_recipe("mine.yaml")
    assert (r.model.num_layers, r.train.steps) == (4, 7)


def test_base_null_means_no_base(tmp_path):
    write(tmp_path, "a.yaml", "base: null\ntrain: {steps: 9}\n")
    assert load_recipe("a.yaml").train.steps == 9


def test_base_cycle(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert error_of("a.yaml") == "cyclic base chain: a.yaml -> b.yaml -> a.yaml"


def test_base_self_cycle(tmp_path):
    write(tmp_path, "a.yaml", "base: a.yaml\n")
    assert error_of("a.yaml") == "cyclic base chain: a.yaml -> a.yaml"


def test_base_not_found(tmp_path):
    write(tmp_path, "a.yaml", "base: gone\n")
    assert error_of("a.yaml") == (
        f"base recipe 'gone' in a.yaml not found: looked for gone, gone, {RECIPES_DIR}/gone, {RECIPES_DIR}/gone.yaml"
    )


def test_base_wrong_type(tmp_path):
    write(tmp_path, "a.yaml", "base: [x]\n")
    assert error_of("a.yaml") == (
        "wrong type for 'base' in a.yaml: expected a recipe name or path, got a list of 1 item"
    )


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path, "a.yaml", "model: {num_layer: 2}\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert error_of("b.yaml") == "unknown key 'model.num_layer' in a.yaml; did you mean 'model.num_layers'?"


# ------------------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.steps=6", "train.steps", 6),
        ("optimizer.min_lr=1e-4", "optimizer.min_lr", 1e-4),
        ("optimizer.lr=2", "optimizer.lr", 2.0),
        ("train.steps=1e3", "train.steps", 1000),
        ("train.steps=12.0", "train.steps", 12),
        ("parallel.distributed_optimizer=true", "parallel.distributed_optimizer", True),
        ("parallel.fsdp=zero3", "parallel.fsdp", "zero3"),
        ("parallel.fsdp=null", "parallel.fsdp", None),
        ("data.path=null", "data.path", None),
        ("data.path=", "data.path", None),
        ("data.path=/tmp/x/text_document", "data.path", "/tmp/x/text_document"),
        ("optimizer.betas=[0.8,0.99]", "optimizer.betas", (0.8, 0.99)),
        ("logging.wandb.mode=disabled", "logging.wandb.mode", "disabled"),
        ("model={num_layers: 2}", "model.num_layers", 2),
    ],
)
def test_override_values(override, key, expected):
    value = load_recipe("tiny_gpt", [override])
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_override_keeps_other_keys_of_the_section():
    r = load_recipe("tiny_gpt", ["model={num_layers: 2}"])
    assert (r.model.num_layers, r.model.hidden_size) == (2, 64)


@pytest.mark.parametrize("override", ["train.steps", "=3", "train..steps=3", ".steps=3"])
def test_override_without_key_path_value(override):
    assert error_of("tiny_gpt", [override]) == (
        f"override '{override}' is not of the form key.path=value (e.g. train.steps=100)"
    )


def test_override_bad_yaml_value():
    assert error_of("tiny_gpt", ["optimizer.betas=[0.9,"]) == (
        "invalid value in override 'optimizer.betas=[0.9,' on the command line: "
        "expected the node content, but found '<stream end>'"
    )


def test_override_unknown_key():
    assert error_of("tiny_gpt", ["model.hiden_size=3"]) == (
        "unknown key 'model.hiden_size' on the command line; did you mean 'model.hidden_size'?"
    )


def test_override_cannot_set_base():
    assert error_of("tiny_gpt", ["base=llama70b"]).startswith(
        "unknown key 'base' on the command line; valid keys at the top level: model, parallel, train,"
    )


# -------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_section_suggests_sibling(tmp_path):
    write(tmp_path, "r.yaml", "model: {hiden_size: 64}\n")
    assert error_of("r.yaml") == "unknown key 'model.hiden_size' in r.yaml; did you mean 'model.hidden_size'?"


def test_unknown_top_level_key(tmp_path):
    write(tmp_path, "r.yaml", "paralel: {tensor: 2}\n")
    assert error_of("r.yaml") == "unknown key 'paralel' in r.yaml; did you mean 'parallel'?"


def test_unknown_key_suggests_other_section(tmp_path):
    write(tmp_path, "r.yaml", "train: {lr: 0.1}\n")
    assert error_of("r.yaml") == "unknown key 'train.lr' in r.yaml; did you mean 'optimizer.lr'?"


def test_unknown_nested_key(tmp_path):
    write(tmp_path, "r.yaml", "logging: {wandb: {projet: x}}\n")
    assert error_of("r.yaml") == ("unknown key 'logging.wandb.projet' in r.yaml; did you mean 'logging.wandb.project'?")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    write(tmp_path, "r.yaml", "data: {zzz: 1}\n")
    assert error_of("r.yaml") == (
        "unknown key 'data.zzz' in r.yaml; valid keys under 'data': path, blend, split, valid_path, "
        "valid_blend, cache_dir, eod_mask_loss, reset_position_ids, reset_attention_mask, tokenizer, num_workers"
    )


def test_source_is_not_a_yaml_key(tmp_path):
    write(tmp_path, "r.yaml", "source: x.yaml\n")
    assert error_of("r.yaml").startswith("unknown key 'source' in r.yaml;")


def test_file_is_named_relative_to_cwd_else_absolute(tmp_path, monkeypatch):
    write(tmp_path, "sub/r.yaml", "model: {hiden_size: 64}\n")
    assert error_of("sub/r.yaml").startswith("unknown key 'model.hiden_size' in sub/r.yaml;")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    message = error_of(str(tmp_path / "sub/r.yaml"))
    assert message.startswith(f"unknown key 'model.hiden_size' in {tmp_path}/sub/r.yaml;")


# ----------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (
            "model: {hidden_size: 64x}",
            "wrong type for 'model.hidden_size' in r.yaml: expected an integer, got the string '64x'",
        ),
        ("model: {hidden_size: 64.5}", "wrong type for 'model.hidden_size' in r.yaml: expected an integer, got 64.5"),
        ("model: {hidden_size: true}", "wrong type for 'model.hidden_size' in r.yaml: expected an integer, got true"),
        (
            "model: {hidden_size: {a: 1}}",
            "wrong type for 'model.hidden_size' in r.yaml: expected an integer, got a mapping",
        ),
        (
            "model: {num_query_groups: two}",
            "wrong type for 'model.num_query_groups' in r.yaml: expected an integer or null, got the string 'two'",
        ),
        ("model: {hidden_size: null}", "wrong type for 'model.hidden_size' in r.yaml: expected an integer, got null"),
        ("optimizer: {lr: fast}", "wrong type for 'optimizer.lr' in r.yaml: expected a number, got the string 'fast'"),
        (
            "parallel: {sequence_parallel: 1}",
            "wrong type for 'parallel.sequence_parallel' in r.yaml: expected true or false, got 1",
        ),
        ("logging: {name: 2024}", "wrong type for 'logging.name' in r.yaml: expected a string, got 2024"),
        (
            "optimizer: {betas: 0.9}",
            "wrong type for 'optimizer.betas' in r.yaml: expected a list of 2 numbers, got 0.9",
        ),
        (
            "optimizer: {betas: [0.9, x]}",
            "wrong type for 'optimizer.betas' in r.yaml: expected a list of 2 numbers, got a list of 2 items",
        ),
        ("model: 3", "wrong type for 'model' in r.yaml: expected a section (mapping of keys), got 3"),
        (
            "logging: {wandb: offline}",
            "wrong type for 'logging.wandb' in r.yaml: expected a section (mapping of keys), got the string 'offline'",
        ),
    ],
)
def test_wrong_types(tmp_path, yaml_text, message):
    write(tmp_path, "r.yaml", yaml_text + "\n")
    assert error_of("r.yaml") == message


def test_empty_section_is_allowed(tmp_path):
    write(tmp_path, "r.yaml", "model:\n  # all commented out\ntrain: {steps: 4}\n")
    assert load_recipe("r.yaml").train.steps == 4


def test_top_level_not_a_mapping(tmp_path):
    write(tmp_path, "r.yaml", "- a\n- b\n")
    assert error_of("r.yaml") == "expected a mapping of sections at the top level in r.yaml, got a list of 2 items"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    write(tmp_path, "r.yaml", "model:\n  hidden_size: 64\n  num_layers: [2\ntrain: {}\n")
    message = error_of("r.yaml")
    assert message.startswith("invalid YAML in r.yaml line 4: ")
    assert "\n" not in message


def test_duplicate_key_is_an_error(tmp_path):
    write(tmp_path, "r.yaml", "model:\n  hidden_size: 64\n  hidden_size: 128\n")
    assert error_of("r.yaml") == "invalid YAML in r.yaml line 3: duplicate key 'hidden_size'"


def test_yaml_1_2_booleans(tmp_path):
    write(tmp_path, "r.yaml", "logging: {name: no}\nparallel: {sequence_parallel: yes}\n")
    assert error_of("r.yaml") == (
        "wrong type for 'parallel.sequence_parallel' in r.yaml: expected true or false, got the string 'yes'"
    )
    assert load_recipe("tiny_gpt", ["logging.name=no", "checkpoint.save=False"]).logging.name == "no"


def test_yaml_1_2_floats_in_files(tmp_path):
    write(tmp_path, "r.yaml", "optimizer: {lr: 1e-3, min_lr: 1.5e-4, eps: 1E-6}\n")
    o = load_recipe("r.yaml").optimizer
    assert (o.lr, o.min_lr, o.eps) == (1e-3, 1.5e-4, 1e-6)


# ---------------------------------------------------------------------------------- static validation


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
            ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn, mla_up_proj]"],
            "model.recompute_modules[1] must be one of core_attn | layernorm | mlp | moe | moe_act | "
            "shared_experts, got 'mla_up_proj'",
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


FP8 = ["train.precision=bf16", "fp8.enabled=true"]
TE = ["model.transformer_impl=transformer_engine"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fp8.enabled=true"], "fp8.enabled = true requires train.precision = bf16, got fp32"),
        (
            [*FP8, "fp8.recipe=delayed"],
            "fp8.recipe = delayed needs model.transformer_impl = transformer_engine (transformer-engine >= 1.7); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, "fp8.recipe=blockwise"],
            "fp8.recipe = blockwise needs model.transformer_impl = transformer_engine (transformer-engine >= 2.3); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, "fp8.recipe=mxfp8"],
            "fp8.recipe = mxfp8 needs model.transformer_impl = transformer_engine (transformer-engine >= 2.1); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, *TE, "fp8.recipe=rowwise"],
            "fp8.recipe = rowwise runs on the local spec only (model.transformer_impl = local); "
            "transformer-engine's recipes are delayed | tensorwise | blockwise | mxfp8",
        ),
        (
            [*FP8, "fp8.params=true"],
            "fp8.params = true (FP8 primary weights) needs model.transformer_impl = transformer_engine",
        ),
        (
            [*FP8, "fp8.amax_history_len=16"],
            "fp8.amax_history_len applies to fp8.recipe = delayed only; tensorwise scales from the current amax",
        ),
        (
            [*FP8, *TE, "fp8.recipe=mxfp8", "fp8.amax_compute_algo=max"],
            "fp8.amax_compute_algo applies to fp8.recipe = delayed only; mxfp8 scales from the current amax",
        ),
        ([*FP8, "fp8.margin=-1"], "fp8.margin must be non-negative, got -1"),
        (
            [*FP8, "fp8.recipe=hybrid"],
            "fp8.recipe must be one of tensorwise | rowwise | delayed | blockwise | mxfp8, got 'hybrid'",
        ),
        (
            [*FP8, *TE, "fp8.recipe=delayed", "fp8.first_last_layers_bf16=1"],
            "fp8.first_last_layers_bf16 cannot be combined with fp8.recipe = delayed",
        ),
        (
            [*FP8, "fp8.first_last_layers_bf16=2"],
            "fp8.first_last_layers_bf16 = 2 at each end leaves no FP8 layer in model.num_layers = 4",
        ),
        (
            [*FP8, *TE, "model.num_layers=8", "parallel.pipeline=4", "fp8.first_last_layers_bf16=3"],
            "fp8.first_last_layers_bf16 = 3 exceeds the 2 layers of a pipeline stage (megatron-core's limit with "
            "transformer-engine)",
        ),
        (
            [*FP8, "model.moe.num_experts=4", "parallel.expert=2"],
            "fp8 on the local spec needs parallel.expert = 1, got 2: an expert's FP8 scales would span the tokens "
            "of several data-parallel ranks, changing its numerics with the layout (use model.transformer_impl = "
            "transformer_engine)",
        ),
        (
            [
                *FP8,
                "model.moe.num_experts=4",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.expert_tensor=1",
            ],
            "fp8 on the local spec needs parallel.expert_tensor = parallel.tensor, got 1 and 2",
        ),
    ],
)
def test_fp8_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


def test_fp8_combinations_that_run():
    for extra in (
        [],
        ["fp8.recipe=rowwise", "fp8.format=e4m3", "fp8.first_last_layers_bf16=1"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2", "parallel.context=2"],
        ["model.moe.num_experts=4", "parallel.tensor=2", "parallel.sequence_parallel=true"],
        [*TE, "fp8.recipe=delayed", "fp8.amax_history_len=1024", "fp8.amax_compute_algo=max", "fp8.margin=0"],
        [*TE, "fp8.recipe=mxfp8", "fp8.params=true", "model.moe.num_experts=4", "parallel.expert=2"],
    ):
        load_recipe("tiny_gpt", [*FP8, *extra])
    # fp8.enabled = false is a plain bf16/fp32 run whatever the other keys say (a baseline from an FP8 recipe)
    assert not load_recipe("tiny_gpt", ["fp8.recipe=delayed", "fp8.params=true"]).fp8.enabled


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


# ----------------------------------------------------------------------------------- shipped recipes


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


def test_llama70b_on_a_wrong_world_size():
    r = load_recipe("llama70b")
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 100)
    assert str(info.value) == (
        "parallel.tensor × parallel.pipeline × parallel.context = 64 does not divide the world size 100"
    )


def test_world_batch_and_expert_messages():
    r = load_recipe(
        "tiny_moe",
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=3", "model.moe.num_experts=6"],
    )
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 6)
    assert str(info.value) == (
        "train.global_batch_size = 8 is not a multiple of train.micro_batch_size × data-parallel size = 2 × 3 = 6"
    )
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 8)
    assert str(info.value) == (
        "parallel.expert × parallel.expert_tensor = 3 × 2 does not divide the world size / parallel.pipeline = 8"
    )
    with pytest.raises(RecipeError, match=re.escape("world size must be positive, got 0")):
        validate_for_world(r, 0)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["parallel.pipeline=4", "train.global_batch_size=4"],
            4,
            "2 micro-batches per step (train.global_batch_size / (micro_batch_size × data-parallel size)) are "
            "fewer than parallel.pipeline = 4: raise train.global_batch_size",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=6"],
            2,
            "3 micro-batches per step are not a multiple of parallel.pipeline = 2, which the interleaved "
            "schedule (parallel.virtual_pipeline) needs",
        ),
    ],
)
def test_micro_batch_messages_for_pipelines(overrides, world, message):
    r = load_recipe("tiny_gpt", overrides)
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, world)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.first_stage_layers=1"],
            "parallel.first_stage_layers requires parallel.pipeline > 1, got parallel.pipeline = 1",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.last_stage_layers=1"],
            "parallel.last_stage_layers cannot be combined with parallel.virtual_pipeline",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=0"],
            "parallel.first_stage_layers must be positive, got 0",
        ),
        (
            ["parallel.pipeline=4", "parallel.first_stage_layers=2"],
            "parallel.first_stage_layers leave 2 of model.num_layers = 4 for 3 other pipeline stage(s): "
            "they must split evenly, at least one layer each",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"],
            "parallel.first_stage_layers and parallel.last_stage_layers leave 1 of model.num_layers = 4 for 0 "
            "other pipeline stage(s): they must split evenly, at least one layer each",
        ),
    ],
)
def test_uneven_pipeline_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


def test_context_parallel_attention_has_no_dropout():
    ring = "uses ring attention, which has no attention dropout"
    ulysses = "has no attention dropout (its CP ranks would draw one mask stream for different heads)"
    for comm, what in (("p2p", ring), ("a2a", ulysses), ("a2a+p2p", ring)):
        extra = ["parallel.context_a2a=2"] if comm == "a2a+p2p" else []
        overrides = ["parallel.context=4", f"parallel.context_comm={comm}", *extra, "model.attention_dropout=0.1"]
        message = f"parallel.context = 4 with parallel.context_comm = {comm} {what}: set model.attention_dropout = 0 (got 0.1)"
        assert error_of("tiny_gpt", overrides) == message


ULYSSES_SHARE = "gives each of those ranks a share of the"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.context=4", "parallel.context_comm=a2a", "parallel.tensor=2"],
            "parallel.context = 4 does not divide model.num_attention_heads / parallel.tensor = 2 "
            f"(parallel.context_comm = a2a {ULYSSES_SHARE} query heads)",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a", "model.hidden_size=96", "model.num_attention_heads=12"]
            + ["model.num_query_groups=6"],
            "parallel.context = 4 and model.num_query_groups / parallel.tensor = 6 do not divide one another "
            f"(parallel.context_comm = a2a {ULYSSES_SHARE} K/V heads, split or copied)",
        ),
        (
            ["parallel.context=8", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4", "parallel.tensor=2"],
            "parallel.context_a2a = 4 does not divide model.num_attention_heads / parallel.tensor = 2 "
            f"(parallel.context_comm = a2a+p2p {ULYSSES_SHARE} query heads)",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p"],
            "parallel.context_comm = a2a+p2p needs parallel.context_a2a: the ranks of one all-to-all group, a "
            "divisor of parallel.context = 4",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=3"],
            "parallel.context_a2a = 3 does not divide parallel.context = 4",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4"],
            "parallel.context_a2a = 4 with parallel.context = 4 leaves a ring of one rank: "
            "set parallel.context_comm = a2a",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=1"],
            "parallel.context_a2a = 1 with parallel.context = 4 leaves an all-to-all of one rank: "
            "set parallel.context_comm = p2p",
        ),
        (
            ["parallel.context=2", "parallel.context_a2a=2"],
            "parallel.context_a2a = 2 is only read with parallel.context_comm = a2a+p2p, got parallel.context_comm = p2p",
        ),
        (
            ["parallel.context=8", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4"]
            + ["model.transformer_impl=transformer_engine"],
            "parallel.tensor × parallel.context_a2a = 4 does not divide model.num_query_groups = 2",
        ),
    ],
)
def test_ulysses_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.context=2", "parallel.context_comm=a2a"],  # K/V heads split: 2 on 2 ranks
        ["parallel.context=4", "parallel.context_comm=a2a"],  # K/V heads copied: 2 to 4 ranks
        ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2", "parallel.tensor=2"],
    ],
)
def test_ulysses_layouts_of_tiny_gpt_load(overrides):
    load_recipe("tiny_gpt", overrides)


def test_uneven_pipeline_split():
    from parallel.config import pipeline_stage_layers

    r = load_recipe(
        "tiny_gpt",
        ["model.num_layers=8", "parallel.pipeline=4", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"],
    )
    assert pipeline_stage_layers(r.parallel, 8) == [1, 2, 2, 3]
    even = load_recipe("tiny_gpt", ["parallel.pipeline=2"])
    assert pipeline_stage_layers(even.parallel, 4) == [2, 2]


# ------------------------------------------------------------------------------------------- dumping


@pytest.mark.parametrize("name", ["tiny_gpt", "llama70b", "llama_1b"])
def test_dump_round_trip(tmp_path, name):
    r = load_recipe(name, ["optimizer.betas=[0.8,0.9]"])
    d = recipe_to_dict(r)
    assert "source" not in d and d["optimizer"]["betas"] == [0.8, 0.9]
    json.dumps(d)  # plain types only
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_recipe(r))
    again = load_recipe(str(path))
    assert recipe_to_dict(again) == d
    assert again.model == r.model and again.optimizer == r.optimizer


def test_dump_writes_lists_inline():
    assert "betas: [0.9, 0.95]" in dump_recipe(load_recipe("tiny_gpt"))


def test_every_error_is_one_line(tmp_path):
    write(tmp_path, "r.yaml", "model: {hidden_size: [1, 2]}\n")
    assert "\n" not in error_of("r.yaml")


def test_a2a_p2p_layout_names_megatrons_hierarchical_groups():
    from parallel.layout import Layout

    overrides = ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2", "parallel.tensor=2"]
    layout = Layout.from_config(load_recipe("tiny_gpt", overrides).parallel, world_size=8)
    assert layout.hierarchical_context == [2, 2]  # [all-to-all group, ring]
    assert layout.describe() == "world 8 = tensor 2 x pipeline 1 x context 4 (a2a 2 x p2p 2) x data 1; expert 1"
    assert Layout(world_size=2, context=2, context_comm="a2a").hierarchical_context is None
    with pytest.raises(RecipeError, match=re.escape("parallel.context_a2a = 3 does not fit parallel.context_comm")):
        Layout(world_size=4, context=4, context_comm="a2a+p2p", context_a2a=3)


@pytest.mark.parametrize(
    "overrides, resolved",
    [
        # (grad reduce, param gather, p2p) overlapped: null = on wherever megatron-core has it
        ([], (True, False, False)),
        (["parallel.distributed_optimizer=true"], (True, True, False)),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2"], (True, False, True)),
        (["parallel.fsdp=zero3"], (False, False, False)),  # FSDP2 overlaps its own
        (
            ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=false"]
            + ["parallel.overlap_param_gather=false"],
            (False, False, False),
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.overlap_p2p_comm=false"],
            (True, False, False),
        ),
    ],
)
def test_overlap_defaults_resolve(overrides, resolved):
    p = load_recipe("tiny_gpt", overrides).parallel
    assert (p.grad_reduce_overlapped, p.param_gather_overlapped, p.p2p_overlapped) == resolved
