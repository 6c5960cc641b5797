"""The plain core attention of the local spec: causal self-attention through one
`F.scaled_dot_product_attention` call (documents in packed samples through model/attention/documents.py);
the context-parallel ones (ring.py, ulysses.py) build on it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention.documents import document_attention, is_document_ids


class SDPAttention(DotProductAttention):
    """Causal core attention through `F.scaled_dot_product_attention` (flash/memory-efficient kernels).

    megatron-core's local DotProductAttention materializes the [b, np, s, s] score matrix; this
    keeps its constructor (head bookkeeping, softmax scale, dropout) and replaces the math with one
    SDPA call, so attention memory is linear in the sequence length.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *args: Any,
        k_channels: int | None = None,
        v_channels: int | None = None,
        **kwargs: Any,
    ):
        """`k_channels` / `v_channels`: multi-latent attention's query/key and value head widths
        (qk_head_dim + qk_pos_emb_head_dim, v_head_dim), which upstream's DotProductAttention does
        not take (only transformer-engine's does); SDPA needs no more than the output width."""
        if config.apply_query_key_layer_scaling:
            # Upstream divides softmax_scale by the layer number and multiplies it back inside
            # its fused softmax; one SDPA call (or one ring) has no such second half.
            raise ValueError(f"{type(self).__name__} does not support apply_query_key_layer_scaling; set it to False")
        super().__init__(config, *args, **kwargs)
        if v_channels is not None:  # MLA: the softmax scale came in softmax_scale, from the q/k width
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object = None,
    ) -> torch.Tensor:
        causal = self._check_call(query.size(0), attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        # [s, b, np, hn] -> [b, np, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if is_document_ids(attention_mask):  # data.reset_attention_mask: [b, s] document ids
            assert attention_mask is not None
            documents = attention_mask
            attend = lambda: document_attention(q, k, v, documents, self.softmax_scale, dropout)
        else:
            attend = lambda: F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=group > 1,
            )
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP ranks, so dropout draws from the tensor-parallel RNG. Under
            # sequence parallelism the transformer block already runs inside that fork
            # (transformer_block.py:706, as upstream's attention assumes: dot_product_attention.py:216);
            # a second fork would rewind the stream to where the block's fork started, so the
            # attention dropout would repeat the first draws and a recompute replay, which restores
            # the outer state only, would draw different masks than the forward did.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        return self._to_hidden(context)

    def _check_call(
        self,
        query_length: int,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None,
        attention_bias: torch.Tensor | None,
        packed_seq_params: object,
    ) -> bool:
        """Causal self-attention only: megatron passes no mask tensor for it in the local spec; the
        only tensor taken is our document ids (model/attention/documents.py). Returns whether the call is
        causal (False for a one-query generation step)."""
        name = type(self).__name__
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(f"{name} supports neither packed sequences nor bias")
        mask_type = attn_mask_type or self.attn_mask_type
        # megatron-core's generation (attention.py:520) asks for no_mask when one new query meets
        # the KV cache: every cached key is then in its past, which is what causal means for it.
        decode_step = mask_type == AttnMaskType.no_mask and query_length == 1
        if (mask_type != AttnMaskType.causal and not decode_step) or (
            attention_mask is not None and not (is_document_ids(attention_mask) and not decode_step)
        ):
            raise NotImplementedError(f"{name} supports causal masks only, got {mask_type}")
        return not decode_step

    def _to_hidden(self, context: torch.Tensor) -> torch.Tensor:
        # [b, np, s, hn] -> [s, b, np * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)
