"""Hugging Face checkpoints <-> our GPTModel: the tensor rules every family (model/hf_config.py:
`Family`, Llama, Mixtral, Qwen3, Qwen3-MoE, DeepSeek-V3) shares, walked one way to import and the other to export.

Our names are GPTModel's state-dict keys at tensor = pipeline = expert = 1 (the converter builds
that layout and lets dist_checkpointing reshard to any other). HF names are the safetensors names
as published (Mixtral experts as `block_sparse_moe.experts.E.w1/w2/w3`, which transformers'
save_pretrained also writes).

`rules` turns a model config and its family (where the family's tensors sit: `Family.qk_norm`,
`Family.experts`) into the list of tensor rules; import and export walk that one list, so an HF
tensor no rule reads, or a rule whose tensor is missing, stops the import in one line.

Layout facts the rules rest on:
- megatron's fused QKV weight holds, per query group, that group's query heads then one key and
  one value head ([groups × (heads/groups + 2) × head_dim, hidden]); HF keeps q, k, v apart.
- megatron's SwiGLU fc1 is [gate; up] stacked on the output dim; HF has gate_proj/up_proj (w1/w3).
- both apply rotary embeddings to each head's two halves (rotate_half), so no permutation.
- our vocabulary is padded (model/gpt.py:padded_vocab_size); padded rows are zero on import and
  dropped on export, and their logits are -inf in every forward (model/gpt.py:mask_padded_logits),
  so the exported model computes what was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch

from common.errors import UserError
from model.config import ModelConfig, head_dim
from model.hf_config import (
    FAMILIES,
    Family,
    export_family,
    family_of,
    hf_config_from_model,
    model_config_from_hf,
)
from model.moe_config import moe_layer_pattern

__all__ = ["FAMILIES", "family_of", "hf_config_from_model", "hf_to_ours", "load_exactly", "model_config_from_hf"]
__all__ += ["ours_to_hf", "rules", "without_absent_mtp"]


# ------------------------------------------------------------------------------ tensors

How = Literal["copy", "rows", "qkv", "stack"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensors it is made of: copied, vocabulary rows (padded on
    import, trimmed on export), the fused QKV, or stacked [first; second] (SwiGLU fc1)."""

    ours: str
    theirs: tuple[str, ...]
    how: How = "copy"


def rules(model: ModelConfig, family: Family) -> list[Rule]:
    """Every tensor of `model` (TP=PP=EP=1 names) with its HF source in `family`."""
    out = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "rows"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if model.untie_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "rows"))
    for i, is_moe in enumerate(moe_layer_pattern(model)):
        out += _layer_rules(model, family, f"decoder.layers.{i}", f"model.layers.{i}", is_moe)
    mtp_moe = moe_layer_pattern(dataclasses.replace(model, num_layers=model.num_layers + 1))[-1]
    for k in range(model.mtp_num_layers):
        out += _mtp_rules(model, family, k, mtp_moe)
    return out


def _mtp_rules(model: ModelConfig, family: Family, k: int, is_moe: bool) -> list[Rule]:
    """MTP module k as DeepSeek-V3 publishes it: layer num_hidden_layers + k with enorm, hnorm,
    eh_proj, shared_head.norm, its own attention and MLP, and copies of the shared embedding and
    output head (checked equal to them on import, written on export)."""
    ours, theirs = f"mtp.layers.{k}", f"model.layers.{model.num_layers + k}"
    head = "output_layer.weight" if model.untie_embeddings else "embedding.word_embeddings.weight"
    return [
        Rule(f"{ours}.enorm.weight", (f"{theirs}.enorm.weight",)),
        Rule(f"{ours}.hnorm.weight", (f"{theirs}.hnorm.weight",)),
        Rule(f"{ours}.eh_proj.weight", (f"{theirs}.eh_proj.weight",)),
        Rule(f"{ours}.final_layernorm.weight", (f"{theirs}.shared_head.norm.weight",)),
        Rule("embedding.word_embeddings.weight", (f"{theirs}.embed_tokens.weight",), "rows"),
        Rule(head, (f"{theirs}.shared_head.head.weight",), "rows"),
        *_layer_rules(model, family, f"{ours}.transformer_layer", theirs, is_moe),
    ]


def _layer_rules(model: ModelConfig, family: Family, ours: str, theirs: str, is_moe: bool) -> list[Rule]:
    """One decoder layer's tensors: ours under `ours`, HF's under `theirs` (model.layers.{i})."""
    attn = f"{theirs}.self_attn"
    out = [
        Rule(f"{ours}.input_layernorm.weight", (f"{theirs}.input_layernorm.weight",)),
        Rule(f"{ours}.pre_mlp_layernorm.weight", (f"{theirs}.post_attention_layernorm.weight",)),
        Rule(f"{ours}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",)),
    ]
    if family.mla:
        out += _mla_rules(f"{ours}.self_attention", attn, model.mla.q_lora_rank is not None)
    else:
        qkv = (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")
        out.append(Rule(f"{ours}.self_attention.linear_qkv.weight", qkv, "qkv"))
    if family.qk_norm:
        out += [
            Rule(f"{ours}.self_attention.q_layernorm.weight", (f"{attn}.q_norm.weight",)),
            Rule(f"{ours}.self_attention.k_layernorm.weight", (f"{attn}.k_norm.weight",)),
        ]
    if not is_moe or family.experts is None:
        return out + _mlp_rules(f"{ours}.mlp", f"{theirs}.mlp", "gate_proj", "up_proj", "down_proj")
    names = family.experts
    block = f"{theirs}.{names.prefix}"
    out.append(Rule(f"{ours}.mlp.router.weight", (f"{block}.gate.weight",)))
    if model.moe.expert_bias:
        out.append(Rule(f"{ours}.mlp.router.expert_bias", (f"{block}.gate.e_score_correction_bias",)))
    if model.moe.shared_expert_ffn_hidden_size:
        out += _mlp_rules(f"{ours}.mlp.shared_experts", f"{block}.shared_experts", names.gate, names.up, names.down)
    for e in range(model.moe.num_experts or 0):
        expert = f"{ours}.mlp.experts.local_experts.{e}"
        out += _mlp_rules(expert, f"{block}.experts.{e}", names.gate, names.up, names.down)
    return out


def _mla_rules(ours: str, theirs: str, q_latent: bool) -> list[Rule]:
    """megatron-core's MLA keeps DeepSeek's layouts (per head [nope, rope] queries, [nope, v] keys/values;
    the kv latent then the shared rope key) and de-interleaves the rope pairs as rope_interleave does."""
    pairs = [("linear_kv_down_proj", "kv_a_proj_with_mqa"), ("kv_layernorm", "kv_a_layernorm")]
    pairs.append(("linear_kv_up_proj", "kv_b_proj"))
    if q_latent:
        pairs += [
            ("linear_q_down_proj", "q_a_proj"),
            ("q_layernorm", "q_a_layernorm"),
            ("linear_q_up_proj", "q_b_proj"),
        ]
    else:
        pairs.append(("linear_q_proj", "q_proj"))
    return [Rule(f"{ours}.{a}.weight", (f"{theirs}.{b}.weight",)) for a, b in pairs]


def _mlp_rules(ours: str, theirs: str, gate: str, up: str, down: str) -> list[Rule]:
    return [
        Rule(f"{ours}.linear_fc1.weight", (f"{theirs}.{gate}.weight", f"{theirs}.{up}.weight"), "stack"),
        Rule(f"{ours}.linear_fc2.weight", (f"{theirs}.{down}.weight",)),
    ]


# HF tensors that are recomputed, not learned (old Llama checkpoints saved them)
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_ours(hf: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict (TP=PP=EP=1 names) from HF tensors. Every rule's tensors must be there and
    every HF tensor must be read by a rule, or a one-line UserError names them."""
    family = export_family(model)
    table = rules(model, family)
    wanted = {name for rule in table for name in rule.theirs}
    missing = sorted(wanted - set(hf))
    tied_head = not model.untie_embeddings and "lm_head.weight" in hf  # some tied checkpoints keep a copy
    read = wanted | ({"lm_head.weight"} if tied_head else set())
    unused = sorted(n for n in set(hf) - read if not n.endswith(_DERIVED_SUFFIXES))
    if missing:
        raise UserError(f"Hugging Face checkpoint lacks {len(missing)} tensor(s) {family.name} needs: {_few(missing)}")
    if unused:
        mtp = f"model.layers.{model.num_layers + model.mtp_num_layers}."
        hint = (  # DeepSeek-V3's MTP module with config.json's num_nextn_predict_layers at 0
            f" (a multi-token prediction module? config.json's num_nextn_predict_layers is {model.mtp_num_layers})"
            if family.mla and any(n.startswith(mtp) for n in unused)
            else ""
        )
        raise UserError(
            f"Hugging Face checkpoint has {len(unused)} tensor(s) no {family.name} rule maps: {_few(unused)}{hint}"
        )
    if tied_head and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise UserError(
            "Hugging Face checkpoint: tie_word_embeddings is true but lm_head.weight differs from embed_tokens"
        )
    groups, heads, d = _qkv_dims(model)
    out: dict[str, torch.Tensor] = {}
    for rule in table:
        parts = [hf[name] for name in rule.theirs]
        if rule.ours in out:  # an MTP module's copy of the shared embedding or output head
            if not torch.equal(_pad_rows(parts[0], padded_vocab), out[rule.ours]):
                raise UserError(f"Hugging Face checkpoint: {rule.theirs[0]} differs from the tensor it copies")
        elif rule.how == "rows":
            out[rule.ours] = _pad_rows(parts[0], padded_vocab)
        elif rule.how == "qkv":
            q, k, v = parts
            q, k, v = q.view(groups, heads // groups * d, -1), k.view(groups, d, -1), v.view(groups, d, -1)
            out[rule.ours] = torch.cat([q, k, v], dim=1).flatten(0, 1)
        elif rule.how == "stack":
            out[rule.ours] = torch.cat(parts)
        else:
            out[rule.ours] = parts[0]
    return out


def without_absent_mtp(hf: Mapping[str, torch.Tensor], model: ModelConfig) -> ModelConfig:
    """`model` without MTP when config.json names MTP modules (num_nextn_predict_layers; transformers'
    default is 1) but the checkpoint holds none of their tensors, as every checkpoint transformers
    saves (it has no MTP module); the caller says so in one line. Some of them present: the import's
    check names the missing ones."""
    first = f"model.layers.{model.num_layers}."
    if not model.mtp_num_layers or any(name.startswith(first) for name in hf):
        return model
    return dataclasses.replace(model, mtp_num_layers=0)


def ours_to_hf(ours: Mapping[str, torch.Tensor], model: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF tensors from our state dict (TP=PP=EP=1 names); the inverse of hf_to_ours."""
    groups, heads, d = _qkv_dims(model)
    out: dict[str, torch.Tensor] = {}
    for rule in rules(model, export_family(model)):
        tensor = ours[rule.ours]
        if rule.how == "rows":
            parts = [tensor[:vocab_size]]
        elif rule.how == "qkv":
            qkv = tensor.view(groups, (heads // groups + 2) * d, -1)
            parts = [p.flatten(0, 1) for p in torch.split(qkv, [heads // groups * d, d, d], dim=1)]
        elif rule.how == "stack":
            parts = list(tensor.chunk(2))
        else:
            parts = [tensor]
        out.update(zip(rule.theirs, parts))
    return {name: t.contiguous() for name, t in out.items()}


def load_exactly(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copies `state` into `model` (TP=PP=EP=1): the same names and shapes, or a one-line UserError
    and the model untouched."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{source}: tensors do not match the architecture (model tensors no rule assigns: "
            f"{_few(missing) or 'none'}; rule tensors the model lacks: {_few(unexpected) or 'none'})"
        )
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: '{name}' has shape {tuple(tensor.shape)}, the architecture needs {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _qkv_dims(model: ModelConfig) -> tuple[int, int, int]:
    heads = model.num_attention_heads
    return model.num_query_groups or heads, heads, head_dim(model)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
