"""`launch.train_preference` config of the proxy-tuning SFT stage (`objective.kind=sft`: token-mean NLL
of the formatted answers), the same steps for the small base (→ expert) and the large one (→ tuned
"chat" oracle). The run passes the pair file, tokenizer and starting checkpoint:

  python -m launch.train_preference --config=experiments/proxy_tuning/tune_config.py --workdir=W \
      --config.data.files=W0/tune.jsonl --config.data.tokenizer=W0/tokenizer.model \
      --config.init_checkpoint=<pretrained workdir> --config.seed=0
"""
import dataclasses

from experiments.proxy_tuning.config import get_config as experiment_config
from jaxllm.data.pairs import PairDataConfig
from jaxllm.methods.preference import config_dict


def get_config():
    c = experiment_config()
    t = c.tune
    config = config_dict(
        model=dict(preset="tiny", vocab_size=c.tokenizer_vocab, max_len=c.max_len),
        objective=dict(kind="cpo"),
        optimizer=dict(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, min_lr_ratio=0.1,
                       weight_decay=0.01),
        steps=t.steps, batch_size=t.batch_size, grad_accum=1, checkpoint_every=t.steps, keep_checkpoints=1,
        log_every=25, seed=0, mesh="fsdp:1",
        extra=dict(data=dataclasses.asdict(PairDataConfig(source="jsonl", files="tune.jsonl",
                                                          tokenizer="tokenizer.model", max_len=t.max_len,
                                                          max_prompt_len=t.max_prompt_len)),
                   init_checkpoint=""),
    )
    config.objective.kind = "sft"  # built as a CPO section (whose fields config_dict knows), trained as SFT
    return config
