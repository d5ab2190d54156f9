"""`launch.train` config of the proxy-tuning bases (`:large` or `:small`), on the facts corpus that
`experiments.proxy_tuning.run` writes; the run passes the corpus and tokenizer paths and the sizes:

  python -m launch.train --config=experiments/proxy_tuning/pretrain_config.py:large --workdir=W \
      --config.data.files=W0/corpus.jsonl --config.data.tokenizer=W0/tokenizer.model --config.seed=0
"""
from experiments.proxy_tuning.config import get_config as experiment_config
from jaxllm.train.config import config_dict


def get_config(size="large"):
    if size not in ("large", "small"):
        raise ValueError(f"size must be 'large' or 'small', got {size!r}")
    c = experiment_config()
    p = c.pretrain
    return config_dict(
        model=dict(preset="tiny", vocab_size=c.tokenizer_vocab, max_len=c.max_len, **c[size]),
        data=dict(source="jsonl", files="corpus.jsonl", tokenizer="tokenizer.model"),
        optimizer=dict(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps, min_lr_ratio=0.1,
                       weight_decay=0.01, clip_norm=1.0),
        steps=p.steps, batch_size=p.batch_size, seq_len=p.seq_len, grad_accum=1,
        checkpoint_every=p.steps, keep_checkpoints=1, log_every=50, seed=0, mesh="fsdp:1", sample_tokens=0,
    )
