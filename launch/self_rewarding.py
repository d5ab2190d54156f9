r"""Self-Rewarding Language Models (arXiv 2401.10020) on the toy instruction task: M0 → M1 (joint SFT
on IFT ∪ EFT) → M2 → M3 (self-judged pairs, DPO β 0.1 with π_ref = M_t).

  python -m launch.self_rewarding --config=experiments/self_rewarding/config.py --workdir=/tmp/jaxllm_sr \
      [--config.loop.iterations=2 --config.task.use_eft=False --config.init_model=DIR ...]

The config is `jaxllm.methods.self_rewarding.toy.config_dict()` plus `init_model`: a model directory,
HF folder or fit workdir whose params are M0 ("" = random init). Each M_t is saved as a model
directory `workdir/M{t}` with `report.json` (pair statistics, parse-failure and tie rates, score
histogram, lengths); running again with the same workdir continues after the newest saved model
(and inside a training stage from its checkpoint: on SIGTERM the run saves one and exits 143).
All logic lives in `jaxllm.methods.self_rewarding`.
"""
import signal
import sys

import jax
from absl import flags
from ml_collections import config_flags

from jaxllm.methods.self_rewarding import loop, toy, training
from jaxllm.model import llama
from jaxllm.model import model_dir
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Self-rewarding config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "M1, M2, M3 model directories and their reports go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    common.start(argv)
    config = _CONFIG.value.to_dict()
    init_model = config.pop("init_model", "")
    setup = toy.build(config)
    if init_model:
        model_cfg, params0 = model_dir.load_model(init_model)
        if model_cfg != setup.model:
            raise ValueError(f"{init_model} holds {model_cfg}, the config asks for {setup.model}")
    else:
        params0 = llama.init_params(setup.model, jax.random.key(config["seed"]))
    print(f"{len(setup.sft_examples)} SFT examples; {setup.cfg.iterations} iterations of "
          f"{setup.cfg.prompts_per_iteration} prompts", flush=True)
    try:
        reports = loop.run(setup.model, params0, setup.tokenizer, setup.sft_examples, setup.prompt_source, setup.cfg,
                           _WORKDIR.value)
    except training.Preempted as e:
        print(e, flush=True)
        sys.exit(128 + signal.SIGTERM)
    for report in reports:
        print(report, flush=True)


if __name__ == "__main__":
    common.run(main)
