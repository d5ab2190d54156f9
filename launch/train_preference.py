r"""Preference-tune a Llama-family model (CPO, DPO and their variants, or SFT on the chosen side) from an
ml_collections config file.

  python -m launch.train_preference --config=experiments/cpo/trainer_config.py --workdir=/tmp/jaxllm_cpo_train \
      [--config.objective.kind=dpo --config.steps=500 --config.init_checkpoint=/tmp/jaxllm_pretrain/checkpoints ...]

The config holds `PreferenceTrainConfig` fields (built with `jaxllm.methods.preference.config_dict`),
a `data` section (`jaxllm.data.pairs.PairDataConfig`) and `init_checkpoint`: any model source of
`jaxllm.model.load_model` (a `launch.train` workdir or its `checkpoints/`, a model directory, an HF
folder) whose params start the policy and whose config replaces `config.model` ("" = random init of
`config.model`); the starting params are also DPO's frozen reference. The workdir records the model
and the SentencePiece tokenizer its JSONL pairs were made with (`jaxllm.model.record_model`), so `load_model(WORKDIR)`
reads the tuned policy back and `launch.serve --source=WORKDIR` serves it without `--tokenizer`. Running it
again with the same workdir resumes from the newest good checkpoint. On SIGTERM the run saves a
checkpoint and exits with status 143 (128 + SIGTERM). All logic lives in
`jaxllm.methods.preference` (a caller of the one loop, `jaxllm.train.fit`).
"""
import dataclasses
import signal
import sys

from absl import flags
from ml_collections import config_flags

from jaxllm.data import pairs as pair_data
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import preference
from jaxllm.model import load_model, record_model
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preference config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    common.start(argv)
    config = _CONFIG.value.to_dict()
    cfg = preference.from_dict(config)
    params = None
    if config["init_checkpoint"]:
        model_cfg, params = load_model(config["init_checkpoint"])
        cfg = dataclasses.replace(cfg, model=model_cfg)
    pairs, tokenizer = pair_data.load_pairs(pair_data.PairDataConfig(**config["data"]))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} is larger than the model's vocab_size "
                         f"{cfg.model.vocab_size}")
    # the toy translation task's word tokenizer has no file format: it is rebuilt from the task
    record_model(_WORKDIR.value, cfg.model, tokenizer if isinstance(tokenizer, Tokenizer) else None)
    print(f"{len(pairs['chosen_tokens'])} pairs of {pairs['chosen_tokens'].shape[1]} tokens; "
          f"objective {cfg.objective or 'sft'}", flush=True)
    data = pair_data.chosen_rows(pairs) if cfg.objective is None else pairs
    result = preference.fit_preference(cfg, data, _WORKDIR.value, params=params)
    if result.preempted:
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    common.run(main)
