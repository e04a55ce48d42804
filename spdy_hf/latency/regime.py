"""The work a regime times (`SPDYConfig.regime`).

- prefill: one forward pass over batch_size x sequence_length random tokens; a causal LM computes the logits of
  the last position only (`regime.logits: last`, what `generate` computes before the first new token: a 49 k
  vocabulary's head over every position is about a fifth of SmolLM2-135M's pass) or of every position (`all`,
  for scoring text);
- decode: one new token for each of batch_size sequences against a key/value cache that already holds
  context_length tokens: every linear layer is a matrix-vector product and attention reads the whole cache.

`regime_inputs` gives the keyword inputs of that unit of work, so that every latency measurement of the model is a
plain `model(**inputs)`; a layer timed alone gets `step_shape`'s tokens, one per sequence in decode, as it gets
them there. For decode, the cache is filled once by the dense model and then held at context_length tokens: each
step gets the cached keys and values of the heads its attention still has (the first ones; timing does not depend
on which) plus its own, and nothing is appended, so a step can be repeated any number of times and a model with
fewer key/value heads (a structured level) runs against the same cache.

Verify times what users time instead (`end_to_end_call`): a forward pass for prefill, and for decode `generate`,
greedy, a fixed number of new tokens (no early end of sequence), from a cache filled by the model itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..config import RegimeConfig
from ..errors import SPDYError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (cpu for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _token_ids(model: nn.Module, shape: tuple[int, int], seed: int) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1000
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=gen).to(model_device(model))


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its key/value cache by ("cache" in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_decodable(model: nn.Module) -> None:
    """Raises unless the model generates with a key/value cache (a causal LM)."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise SPDYError(f"regime.mode 'decode' times generation with a key/value cache, which "
                        f"{type(model).__name__} does not do; use regime.mode 'prefill' (the default) for it.")


def last_logits_only(model: nn.Module) -> dict:
    """The keyword that makes a forward pass compute the last position's logits only, where the model takes it
    (`logits_to_keep`, as `generate` passes it), else nothing."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _filled_cache(model: nn.Module, ids: torch.Tensor):
    # only the cache is wanted: the logits of the last position, where the model can say so (a 512-token context's
    # full logits over a 49 k vocabulary would be 100 MB for nothing)
    last = last_logits_only(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **last)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise SPDYError(f"{type(model).__name__} returned no layered key/value cache; the decode regime needs "
                        "transformers' Cache classes (transformers >= 4.56).")
    return cache


def _hold_context(layer) -> None:
    """Makes a filled cache layer answer every update with its keys/values (first heads) plus the new ones,
    storing nothing."""
    def update(key_states, value_states, *args, **kwargs):
        heads = key_states.shape[1]
        return (torch.cat([layer.keys[:, :heads], key_states], dim=-2),
                torch.cat([layer.values[:, :heads], value_states], dim=-2))

    layer.update = update


def _cache_state(cache) -> list[dict]:
    """What each layer of a filled cache holds: its keys and values and its counts (a sliding-window layer's tokens
    seen so far). A generation step replaces these, never writes into them, so the dictionaries bring the layers
    back as they were (the cache's own `crop` changed meaning across versions, and drops a sliding-window layer's
    window)."""
    return [dict(vars(layer)) for layer in cache.layers]


def _restore_cache(cache, state: list[dict]) -> None:
    for layer, held in zip(cache.layers, state):
        vars(layer).clear()
        vars(layer).update(held)


def step_shape(regime: RegimeConfig) -> tuple[int, int]:
    """(sequences, new tokens per sequence) of one unit of work: (batch_size, sequence_length) for a prefill pass,
    (batch_size, 1) for a decode step. Every linear layer's input has their product (`regime.tokens`) rows; a unit
    timed alone must be timed at that size, as the whole model is."""
    return regime.batch_size, 1 if regime.mode == "decode" else regime.sequence_length


def regime_inputs(model: nn.Module, regime: RegimeConfig) -> dict:
    """The keyword inputs of one unit of work in the regime (random token ids, seeded): a forward pass over
    batch_size x sequence_length tokens, or one decode step against a cache of context_length tokens."""
    if regime.mode != "decode":
        ids = _token_ids(model, step_shape(regime), 0)
        last = last_logits_only(model) if regime.logits == "last" else {}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **last}
    check_decodable(model)
    context = _token_ids(model, (regime.batch_size, regime.context_length), 0)
    cache = _filled_cache(model, context)
    for layer in cache.layers:
        _hold_context(layer)
    step = _token_ids(model, step_shape(regime), 1)
    mask = torch.ones(regime.batch_size, regime.context_length + 1, dtype=torch.long, device=step.device)
    return {"input_ids": step, "attention_mask": mask, cache_argument(model): cache, "use_cache": True}


def end_to_end_call(model: nn.Module, regime: RegimeConfig, new_tokens: int) -> tuple[Callable[[], object], int]:
    """What verify times, built for the model as it is now (call it again after swapping modules in): a function
    and how many units of work one call does (forward passes, or tokens generated).

    Decode: `generate`, greedy, exactly `new_tokens` new tokens after a prompt of context_length + 1 tokens whose
    first context_length are already in a cache the model filled itself; the cache is put back after each call.
    """
    if regime.mode != "decode":
        inputs = regime_inputs(model, regime)
        return (lambda: model(**inputs)), 1
    check_decodable(model)
    prompt = _token_ids(model, (regime.batch_size, regime.context_length + 1), 0)
    cache = _filled_cache(model, prompt[:, :-1])
    filled = _cache_state(cache)
    mask = torch.ones_like(prompt)
    name, pad = cache_argument(model), getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)

    def call():
        model.generate(input_ids=prompt, attention_mask=mask, **{name: cache}, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                       pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else 0))
        _restore_cache(cache, filled)

    return call, new_tokens
