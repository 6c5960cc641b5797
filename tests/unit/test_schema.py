"""The recipe machinery (common/schema.py) through `load_recipe`: precedence, `base:` chains,
overrides, unknown keys with did-you-mean, type checks, YAML dumps that load back equal."""

import json

import pytest

from pretrain.recipe import RECIPES_DIR, Recipe, dump_recipe, load_recipe, recipe_to_dict
from tests.helpers.recipes import error_of, in_tmp, write  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

# --------------------------------------------------------------------------------------- precedence


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


# -------------------------------------------------------------------------------------- base chains


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


# ---------------------------------------------------------------------------------------- overrides


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


# ------------------------------------------------------------------------------------- unknown keys


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


# -------------------------------------------------------------------------------------- wrong types


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


# ------------------------------------------------------------------------------------------ dumping


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
