"""Policy rollouts for RL fine-tuning: sample with the one sampler, score with one training forward.

`sample` draws responses with `jaxllm.serve.Engine` (the current weights via `set_params`), and
`pack` lays prompt + response out as training rows of one static shape: the prompt left-padded to
`prompt_len` P, so response token t of every row sits at column P + t, then the response,
right-padded to `response_len` T. Left padding lives in its own segment (`segment_ids` 0) and the
real tokens' positions start at 0, so the forward sees exactly what the engine saw. The response
mask comes from each sample's length (the engine's finish), never from comparing tokens with a pad
id, so it is right when pad == eos (lqtrung1998/mwp_ReFT issue #25).

`response_view` turns a training forward over those rows into [B, T] arrays over response
positions (logits at column P − 1 + t predict response token t; the value of that state is read
at the same column), the shape `jaxllm.objectives.ppo` works in.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.serve.engine import Engine
from jaxllm.serve.outputs import Completion
from jaxllm.serve.sampling import SamplingParams


def sample(engine: Engine, params, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop_token: int,
           temperature: float = 1.0, seed: int = 0, n: int = 1) -> list[Completion]:
    """`n` responses per prompt from `params` (prompt-major), T = `temperature`, no top-k/top-p."""
    engine.set_params(params)
    return engine.generate(list(prompts), SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                         stop_tokens=(stop_token,), seed=seed, n=n))


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, prompt_len: int,
         response_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Training rows of (prompt, response) pairs: {"tokens", "positions", "segment_ids"} [B, P + T]
    and "mask" [B, T] (1 on each response's tokens, its stop token included). ValueError naming the
    row whose prompt or response does not fit, or whose response is empty."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    B, P, T = len(prompts), prompt_len, response_len
    tokens = np.full((B, P + T), pad_id, np.int32)
    positions = np.zeros((B, P + T), np.int32)
    segment_ids = np.zeros((B, P + T), np.int32)
    mask = np.zeros((B, T), np.float32)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        n, m = len(prompt), len(response)
        if not 1 <= n <= P:
            raise ValueError(f"row {b}: prompt of {n} tokens does not fit prompt_len {P}")
        if not 1 <= m <= T:
            raise ValueError(f"row {b}: response of {m} tokens does not fit response_len {T} (or is empty)")
        tokens[b, P - n:P + m] = list(prompt) + list(response)
        positions[b, P - n:] = np.arange(n + T)
        segment_ids[b, P - n:] = 1
        mask[b, :m] = 1.0
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "mask": mask}


def response_view(logits_BLV, values_BL, tokens_BL, prompt_len: int, *, temperature: float = 1.0):
    """(logp_BT, values_BT, entropy_BT) over response positions of a forward over `pack` rows:
    log-probs of the response tokens and entropies of the policy at temperature `temperature` (the
    distribution the engine sampled from), and the values of the states that emitted them
    (`values_BL` may be None: zeros)."""
    P = prompt_len
    T = tokens_BL.shape[1] - P
    logits_BTV = logits_BLV[:, P - 1:P - 1 + T].astype(jnp.float32) / temperature
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, tokens_BL[:, P:, None], axis=-1)[..., 0]
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    values_BT = jnp.zeros_like(logp_BT) if values_BL is None else values_BL[:, P - 1:P - 1 + T].astype(jnp.float32)
    return logp_BT, values_BT, entropy_BT


def engine_logprobs(completions: Sequence[Completion], response_len: int) -> np.ndarray:
    """The engine's per-token log-probs of each completion as a [B, T] array (0 past its end)."""
    out = np.zeros((len(completions), response_len), np.float32)
    for b, c in enumerate(completions):
        out[b, :len(c.logprobs)] = c.logprobs
    return out
