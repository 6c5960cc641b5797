"""Group-limited routing (DeepSeek-V3's node-limited routing, megatron-core's moe_router_num_groups /
moe_router_group_topk): the checks of its `model.moe` keys."""

from __future__ import annotations

from typing import Any

from common.errors import RecipeError


def check_groups(moe: Any) -> None:
    """model.moe.num_groups / group_top_k against the expert count and top_k (`moe`: a MoeConfig of
    model/config.py, which imports this module)."""
    if (moe.num_groups is None) != (moe.group_top_k is None):
        raise RecipeError("model.moe.num_groups and model.moe.group_top_k are set together (group-limited routing)")
    if moe.num_groups is None or moe.group_top_k is None or moe.num_experts is None:
        return
    if moe.num_experts % moe.num_groups:
        raise RecipeError(
            f"model.moe.num_groups = {moe.num_groups} does not divide model.moe.num_experts = {moe.num_experts}"
        )
    if moe.group_top_k > moe.num_groups:
        raise RecipeError(f"model.moe.group_top_k = {moe.group_top_k} exceeds model.moe.num_groups = {moe.num_groups}")
    if moe.top_k % moe.group_top_k:
        raise RecipeError(
            f"model.moe.group_top_k = {moe.group_top_k} does not divide model.moe.top_k = {moe.top_k} "
            "(megatron-core scores a group by the sum of its top_k / group_top_k highest expert scores)"
        )
    if moe.top_k > moe.group_top_k * (moe.num_experts // moe.num_groups):
        per_group = moe.num_experts // moe.num_groups
        raise RecipeError(
            f"model.moe.top_k = {moe.top_k} exceeds the experts a token can reach: model.moe.group_top_k × "
            f"experts per group (model.moe.num_experts / num_groups) = {moe.group_top_k} × {per_group}"
        )
