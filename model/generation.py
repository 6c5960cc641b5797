"""Text generation with a KV cache through megatron-core's static-batch inference path, and our sampler.

megatron-core 0.16 serves generation two ways. Its dynamic engine (paged KV cache) needs flash-attn
and CUDA, so it cannot run on a CPU (tried: "No module named 'flash_attn'"). Its static-batch path
(`StaticInferenceContext` for the KV cache, `GPTInferenceWrapper` for prefill/decode steps and the
pipeline-stage transfers, `TextGenerationController` for the loop) runs on both, with two things
of ours: SDPAttention takes the `no_mask` decode steps (model/attention/sdpa.py), and on a CPU the loop's
timing events are host events (upstream/cpu.py, `stream.Event`). The sampler is ours: upstream's
takes top-k or top-p but not both, divides by a temperature of 0, and draws from a generator that
every process must seed alike.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits (the order and meaning of transformers' warpers)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely ids; 0 = all
    top_p: float = 1.0  # keep the smallest set of ids whose probability reaches p; 1 = all
    seed: int = 1234


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[b, vocab] logits scaled by the temperature, with the ids outside top-k, then outside top-p,
    set to -inf (for a temperature > 0)."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - sampling.top_p  # the least likely ids whose mass stays below 1 - p
        drop[..., -1] = False  # the most likely id is always kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[b] next ids from [b, vocab] logits; -inf logits (padded or undecodable ids) are never drawn."""
    if sampling.temperature == 0:
        return torch.argmax(logits, dim=-1)
    probabilities = filter_logits(logits, sampling).softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).view(-1)


class _Tokenizer:
    """What megatron-core's controller asks of a tokenizer: the EOD (termination and padding),
    decoding, and no BOS."""

    bos = None

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.eod = tokenizer.eod

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.detokenize([int(i) for i in ids])


def _controller_class() -> type:
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class SamplingController(TextGenerationController):
        """megatron-core's controller with our sampler, which also hands each new id to `on_token`."""

        def __init__(self, wrapped: Any, tokenizer: Any, sampling: Sampling, decodable: int, on_token: Callable):
            super().__init__(wrapped, tokenizer)
            self.sampling, self.decodable, self.on_token = sampling, decodable, on_token
            self.generator = torch.Generator(device="cpu").manual_seed(sampling.seed)

        def sample_from_logits(self, last_token_logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # [b, padded vocab], the same on every rank (gathered over TP, broadcast over PP); the
            # CPU generator draws the same id on every rank from the same seed.
            logits = last_token_logits.float().cpu()
            logits[:, self.decodable :] = float("-inf")  # padding and ids the tokenizer cannot decode
            ids = sample(logits, self.sampling, self.generator)
            self.on_token(int(ids[0]))
            return ids.to(last_token_logits.device)

    return SamplingController


def generate(
    chunk: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    decodable: int,
    on_token: Callable[[int], None] = lambda token: None,
) -> list[int]:
    """The ids generated after `prompt_ids` by this rank's model chunk (one prompt, KV cache), up
    to `max_new_tokens` or the tokenizer's EOD (included); `on_token` sees each id as it is drawn.
    Collective over the model-parallel ranks: every rank calls it with the same arguments. Ids at or
    beyond `decodable` are never drawn."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.utils import get_model_config

    config = get_model_config(chunk)
    total = len(prompt_ids) + max_new_tokens
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # one prompt: never split it into micro-batches
        padded_vocab_size=_padded_vocab(chunk),
        inference_max_requests=1,
        inference_max_seq_length=total,
    )
    wrapped = GPTInferenceWrapper(chunk, wrapper_config, StaticInferenceContext(1, total))
    controller = _controller_class()(wrapped, _Tokenizer(tokenizer), sampling, decodable, on_token)
    request = InferenceRequest(
        request_id=0,
        prompt="",
        sampling_params=SamplingParams(num_tokens_to_generate=max_new_tokens),
        prompt_tokens=list(prompt_ids),
    )
    done = controller.generate_all_output_tokens_static_batch(OrderedDict({0: request}))
    return [int(i) for i in done[0].generated_tokens.tolist()]


def _padded_vocab(chunk: torch.nn.Module) -> int:
    """The model's padded vocabulary (its embedding rows on all tensor ranks)."""
    model: Any = getattr(chunk, "module", chunk)
    return int(model.vocab_size)
