r"""ReFT (arXiv 2401.08967) from an ml_collections config: SFT warm-up → ReFT → evaluation.

  python -m launch.reft --config=experiments/reft/config.py --workdir=/tmp/jaxllm_reft --stage=all

  sft   one SFT run on the gold chains of thought (workdir/sft: checkpoints, metrics.jsonl); writes
        the warm-up (epoch `sft.warmup_epochs`) and SFT-best (best validation greedy accuracy)
        model directories workdir/warmup and workdir/sft_best
  reft  PPO from workdir/warmup with the warm-up as the frozen reference (workdir/reft:
        checkpoints, metrics.jsonl with the rollout metrics); writes the model directories
        workdir/reft_policy (the policy) and workdir/reft_value (the model carrying the value
        head: the policy with its head on a shared trunk, else the critic; config value_head=true)
  eval  greedy, voting@k and pass@k accuracy of every model present on the validation and test
        splits → workdir/eval.json

The task is the generated arithmetic word problems of `jaxllm.data.tasks.arith` (N-CoT or P-CoT),
regenerated from the config in every stage. Stages resume from their newest checkpoint; a PPO run
stopped inside a rollout (SIGTERM) resumes exactly, the rollout being saved with the checkpoint.
"""
import dataclasses
import json
import pathlib

import jax
from absl import flags
from ml_collections import config_flags

from jaxllm import configs
from jaxllm.data.tasks import arith
from jaxllm.methods import reft, reft_sft
from jaxllm.model import model_dir
from launch import common

STAGES = ("sft", "reft", "eval")
MODELS = ("warmup", "sft_best", "reft_policy")

_CONFIG = config_flags.DEFINE_config_file("config", None, "ReFT config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage outputs go here.")
_STAGE = flags.DEFINE_enum("stage", None, STAGES + ("all",), "Which stage to run.")
flags.mark_flags_as_required(["config", "workdir", "stage"])


def run_stage(stage: str, c, workdir: pathlib.Path) -> None:
    t = c.task
    task = reft.ReasoningTask(arith.CharTokenizer(), arith.prompt, arith.EXTRACTORS[t.style], arith.parse_gold)
    splits = arith.splits(t.train, t.val, t.test, t.split_seed, t.style)
    model_cfg = configs.model_from_dict({**c.model.to_dict(), "vocab_size": task.tokenizer.vocab_size})
    reft_cfg = configs.from_mapping(reft.ReFTConfig, {**c.reft.to_dict(), "seed": c.seed}, "reft.")
    if stage == "sft":
        s = c.sft
        result = reft_sft.sft(model_cfg, None, splits["train"], splits["val"], task, workdir / "sft",
                              epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                              warmup_epochs=s.warmup_epochs, length=reft_cfg.max_total_len,
                              max_tokens=reft_cfg.response_len, seed=c.seed, mesh=c.mesh, verbose=True)
        model_dir.save_model(workdir / "warmup", model_cfg, result.warmup_params)
        model_dir.save_model(workdir / "sft_best", model_cfg, result.best_params)
        (workdir / "sft_history.json").write_text(json.dumps({"best_epoch": result.best_epoch,
                                                              "history": result.history}, indent=1))
    elif stage == "reft":
        _, warmup = model_dir.load_model(workdir / "warmup")
        result = reft.run(reft_cfg, model_cfg, warmup, splits["train"], task, workdir / "reft", mesh=c.mesh,
                          verbose=True)
        params = jax.device_get(result.state.params)
        policy = reft.policy_params(reft_cfg, model_cfg, params)
        model_dir.save_model(workdir / "reft_policy", dataclasses.replace(model_cfg, value_head=False), policy)
        model_dir.save_model(workdir / "reft_value", *reft.actor_critic(reft_cfg, model_cfg).value_model(params))
    else:
        engine = reft_sft.make_engine(model_cfg, None, max_len=reft_cfg.max_total_len)
        scores = {}
        for name in MODELS:
            if (workdir / name).is_dir():
                _, params = model_dir.load_model(workdir / name)
                scores[name] = {split: reft_sft.evaluate(engine, params, splits[split], task,
                                                         max_tokens=reft_cfg.response_len, k=c.eval_k, seed=c.seed)
                                for split in ("val", "test")}
                print(name, scores[name], flush=True)
        (workdir / "eval.json").write_text(json.dumps(scores, indent=1))


def main(argv):
    common.start(argv)
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    for stage in STAGES if _STAGE.value == "all" else (_STAGE.value,):
        run_stage(stage, _CONFIG.value, workdir)


if __name__ == "__main__":
    common.run(main)
