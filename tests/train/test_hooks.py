"""The end-of-training sample (through the engine) against exact sequential greedy decoding with
the full forward pass, and through `fit` as a hook."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data.tokenizer import Tokenizer
from jaxllm.model import llama, presets
from jaxllm.train import hooks

CFG = presets.get("tiny", vocab_size=4096, max_len=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0))


def test_greedy_completion_equals_sequential_full_forward(params):
    tokenizer = Tokenizer.default()
    prompt = tokenizer.encode("def main", bos=True)
    new = 12
    seq = np.zeros((1, len(prompt) + new), np.int32)  # causal: zeros after t do not change logits at t
    seq[0, :len(prompt)] = prompt
    forward = jax.jit(lambda tokens: llama.forward(CFG, params, tokens))
    for t in range(len(prompt), len(prompt) + new):
        seq[0, t] = np.asarray(forward(jnp.asarray(seq))[0, t - 1]).argmax(-1)
    continuation = seq[0, len(prompt):].tolist()
    if tokenizer.eos_id in continuation:
        continuation = continuation[:continuation.index(tokenizer.eos_id)]
    want = tokenizer.decode(prompt + continuation)
    assert hooks.complete_text(CFG, params, tokenizer, "def main", new) == want

    hook = hooks.sample_hook(CFG, tokenizer, "def main", new, at_step=5, verbose=False)
    state = type("State", (), {"params": params})()
    assert hook(4, state, {}) is None
    assert hook(5, state, {}) == {"sample": want}


def test_completion_longer_than_the_model_is_rejected(params):
    with pytest.raises(ValueError, match="exceeds the model's max_len 64"):
        hooks.complete_text(CFG, params, Tokenizer.default(), "def main", 64)
