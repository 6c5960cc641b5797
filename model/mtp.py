"""Multi-token prediction (DeepSeek-V3) through megatron-core's MultiTokenPredictionBlock on our
local layers: the combinations refused, the TransformerConfig fields and the MTP block's spec.

Each MTP module k predicts token i+k+1 from the main model's output at i and the embedding of
token i+k: both RMSNorm-ed (hnorm, enorm), concatenated [embedding; hidden], projected (eh_proj),
one transformer layer, a final RMSNorm, and the shared output head. Its loss (the mean over the
tokens that have a target) times mtp_loss_scaling_factor / mtp_num_layers is added to the LM
loss's gradient (megatron-core's MTPLossAutoScaler); the logged `loss` stays the LM loss alone."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError

if TYPE_CHECKING:
    import torch


def check_mtp(model: Any) -> None:
    """What MTP is not verified with, each refused in one line; `model` a ModelConfig."""
    n = model.mtp_num_layers
    if not n:
        return
    why = f"model.mtp_num_layers = {n}"
    if model.transformer_impl != "local":
        raise RecipeError(f"{why} is built on the local spec only: set model.transformer_impl = local")
    if model.recompute_granularity == "full" and (model.recompute_method, model.recompute_num_layers) != ("uniform", 1):
        raise RecipeError(  # megatron-core skips recompute for MTP with block, asserts 1 layer with uniform
            f"{why} with full recompute needs model.recompute_method = uniform and model.recompute_num_layers = 1"
        )


def mtp_config_fields(model: Any) -> dict[str, Any]:
    """TransformerConfig's MTP fields (None: no MTP, megatron-core's sentinel)."""
    if not model.mtp_num_layers:
        return {}
    return dict(mtp_num_layers=model.mtp_num_layers, mtp_loss_scaling_factor=model.mtp_loss_scaling_factor)


def mtp_block_spec(layer: Any, num_layers: int) -> Any:
    """The MTP block of `num_layers` modules, each around `layer` (the local layer spec its
    transformer layer is built from: MoE when layer num_layers of the main model would be), with
    our RMSNorm for enorm, hnorm and the final norm."""
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        get_mtp_layer_spec,
    )

    from model.layers import RMSNorm

    spec = get_mtp_layer_spec(layer, use_transformer_engine=False)
    spec.submodules.enorm = spec.submodules.hnorm = spec.submodules.layer_norm = RMSNorm
    return MultiTokenPredictionBlockSubmodules(layer_specs=[spec] * num_layers)


def mtp_parameters(model: Any, layer: int) -> int:
    """One MTP module's parameters beyond its transformer layer (`layer` of them): enorm, hnorm,
    the [2h -> h] projection and the final norm; the embedding and output head are shared."""
    h = model.hidden_size
    return 3 * h + 2 * h * h + layer


def take_mtp_loss() -> float:
    """This rank's MTP loss since the last call (the mean over MTP modules of the sum over its
    micro-batches of each one's token mean), from megatron-core's tracker, which is then cleared;
    0 on a rank without MTP (not the last pipeline stage) or in evaluation (nothing tracked)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return 0.0
    value = float(tracker["values"].mean())
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return value


def document_starts(documents: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """[b, s/cp] bool: which of this context-parallel rank's positions (the load-balanced layout:
    data/dataset.py:slice_for_context_parallel) start a document after the sample's first, from
    the whole sample's document ids [b, s]."""
    import torch

    from model.attention.documents import ring_chunk_ids

    starts = torch.zeros_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return ring_chunk_ids(starts, cp_rank, cp_size) if cp_size > 1 else starts


@functools.cache
def with_documents_in_mtp(base: type) -> type:
    """`base` (megatron-core's GPTModel or a subclass) whose MTP module stops at document ends
    (data.reset_attention_mask: document ids in the attention mask argument). MTP module 1 at
    position i embeds token i+1 and targets label i+1; megatron-core rolls the input ids, labels and
    loss mask one position for it (across context-parallel ranks), and respects documents only in
    its packed THD format. Zeroing the document starts before that roll gives each document's own:
    at a document's last position the input id is 0 and the loss masked (as megatron-core's packed
    roll and its sample end), elsewhere the tokens of the same document. One module only (a second
    roll of the loss mask would need the zeroing again: data/config.py refuses more)."""
    import torch

    from model.attention.documents import is_document_ids

    class DocumentMTPModel(base):
        def _postprocess(
            self, *, input_ids: Any, labels: Any, loss_mask: Any, attention_mask: Any, **kwargs: Any
        ) -> Any:
            if labels is not None and self.mtp_process and is_document_ids(attention_mask):
                starts = document_starts(attention_mask, self.cp_group.rank(), self.cp_group.size())
                input_ids = input_ids.masked_fill(starts, 0)
                mask = torch.ones_like(labels, dtype=torch.float) if loss_mask is None else loss_mask
                loss_mask = mask.masked_fill(starts, 0)
            return super()._postprocess(
                input_ids=input_ids, labels=labels, loss_mask=loss_mask, attention_mask=attention_mask, **kwargs
            )

    return DocumentMTPModel
