"""CPO on toy-translation pairs with the preference launcher: the tiny Llama, triplets of (gilded
reference, synthetic systems with 10 % and 25 % sentence errors), best vs worst by oracle chrF.

  python -m launch.train_preference --config=experiments/cpo/trainer_config.py --workdir=/tmp/jaxllm_cpo_train

`--config.objective.kind=dpo` (or `sft`), `--config.objective.nll_weight=0` (prefer-only),
`--config.objective.loss_type=simpo`, `--config.init_checkpoint=<launch.train workdir>/checkpoints`, ...
"""
import dataclasses

from jaxllm.data.pairs import PairDataConfig
from jaxllm.methods.preference import config_dict


def get_config():
    return config_dict(
        model=dict(preset="tiny", vocab_size=96, max_len=32),
        objective=dict(kind="cpo", beta=0.1, loss_type="sigmoid"),
        optimizer=dict(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.01),
        steps=200, batch_size=32, grad_accum=1, checkpoint_every=100, keep_checkpoints=2, log_every=20,
        seed=0, mesh="fsdp:-1",
        extra=dict(data=dataclasses.asdict(PairDataConfig(source="translation", num_sources=2000, max_len=24,
                                                          max_prompt_len=12)),
                   init_checkpoint=""),
    )
