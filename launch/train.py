r"""Pre-train a Llama-family model from an ml_collections config file.

  python -m launch.train --config=experiments/pretrain/config.py --workdir=/tmp/jaxllm_pretrain \
      [--config.steps=1000 --config.model.d_model=512 ...]

Every config field can be overridden with a dotted flag; a misspelt field is an error (the
config is locked). Running it again with the same workdir resumes from the newest good
checkpoint. The workdir records the model (`config.json` and the tokenizer), so
`jaxllm.model.load_model(WORKDIR)` (and `--source=WORKDIR` of every launcher) reads the newest
checkpoint back without the config file. On SIGTERM the run saves a checkpoint and exits with status 143 (128 + SIGTERM), so
a supervisor restarts it; the restarted run resumes. All logic lives in `jaxllm.train` (`pretrain`, a caller of the one loop `fit`).
"""
import signal
import sys

from absl import flags
from ml_collections import config_flags

from jaxllm.train import config as config_lib
from jaxllm.train import pretrain
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    common.start(argv)
    result = pretrain.pretrain(config_lib.TrainConfig.from_dict(_CONFIG.value.to_dict()), _WORKDIR.value)
    if result.preempted:
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    common.run(main)
