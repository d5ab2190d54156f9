"""Proxy-tuning mini-reproduction config (see README.md): a "large" and a "small" base pretrained on
generated key → value facts, both tuned on an unseen question/answer format, then greedy decoding of
held-out questions by base-large, expert-small, proxy-large (α sweep) and tuned-large.

  nice -n 10 python -m experiments.proxy_tuning.run --config=experiments/proxy_tuning/config.py \
      --workdir=/tmp/jaxllm_proxy_tuning

Any field can be overridden, e.g. `--config.seeds=0 --config.pretrain.steps=200`.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seeds = (0, 1, 2)  # pretraining and tuning seeds (init and data order); the world is fixed
    c.task = dict(num_facts=300, num_values=24, num_unknown=60, world_seed=0)  # jaxllm.data.tasks.facts
    # disjoint keys: tuning questions (known + unknown) and held-out test questions (known + unknown)
    c.splits = dict(tune=150, test=120, tune_unknown=30, test_unknown=30, seed=0)
    c.tokenizer_vocab = 1024  # SentencePiece BPE on the corpus + tuning texts (shared by every model)
    c.max_len = 64
    # model shapes over the `tiny` preset; vocab = tokenizer_vocab
    c.large = dict(d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256)
    c.small = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
    c.pretrain = dict(steps=300, batch_size=32, seq_len=64, learning_rate=3e-3, warmup_steps=20)
    c.tune = dict(steps=150, batch_size=32, learning_rate=1e-3, warmup_steps=10, max_len=24, max_prompt_len=16)
    c.alphas = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
    c.max_tokens = 8  # greedy answer length cap ("A: value ." is ~5 tokens)
    c.speed_tokens = 16  # tokens per prompt (no stop) for the proxy-vs-plain throughput measurement
    c.engine = dict(block_size=16, num_blocks=256, max_seqs=160, token_budget=256, buckets=(256,))
    return c
