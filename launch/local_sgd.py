r"""Train one Local-SGD arm on the embedded corpus, in the simulator or on Ray.

  python -m launch.local_sgd --config=experiments/local_sgd/config.py:async_dn_dylu --workdir=/tmp/lsgd
  python -m launch.local_sgd --config=experiments/local_sgd/config.py:sync --workdir=/tmp/lsgd_ray \
      --config.backend=ray --config.ray.worker_cpus=0.5 --config.ray.server_cpus=0.5

backend "simulator": the in-process replay of the simulated events (`local_sgd.run`; times are
simulated seconds, exactly reproducible). backend "ray": one actor process per worker plus a
parameter-server actor (`local_sgd.ray_runtime`); `ray.schedule` "live" applies pseudo-gradients
in real arrival order (times are wall-clock seconds), "replay" follows the simulated events and
gives the simulator's result. `ray.address` "" starts a local Ray (or joins RAY_ADDRESS); on a
cluster give its address, with the project installed on every node. Lost worker actors are
replaced (`ray.replace_lost_workers`) or retired; see `jaxllm.methods.local_sgd.ray_runtime`.
With `ray.checkpoint_every` N > 0 the parameter server checkpoints every N outer updates into
`WORKDIR/server_checkpoints` (params, outer optimizer state, history, schedule position), and the
same command run again continues from the newest one.

Writes `WORKDIR/result.json`: the config, the eval history, every arrival, and the final test
loss and perplexity.
"""
import json
import math
import os
import time

from absl import flags
from ml_collections import config_flags

from jaxllm.methods.local_sgd import LocalSGDConfig, lm_task
from jaxllm.methods.local_sgd.runner import run
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Local-SGD config file, one arm (get_config('ARM')).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "result.json goes here.")
flags.mark_flags_as_required(["config", "workdir"])
BACKENDS = ("simulator", "ray")


def _train(c, lsgd: LocalSGDConfig, lm: lm_task.CorpusLM, workdir: str):
    eval_every = c.eval_every_sync if lsgd.mode == "sync" else c.eval_every_async
    if c.backend == "simulator":
        return run(lsgd, lm.params, lm.task, lm.eval_fn, eval_every=eval_every)
    from jaxllm.methods.local_sgd.ray_runtime import require_ray, run_ray  # pylint: disable=import-outside-toplevel

    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=c.ray.address or None)
    return run_ray(lsgd, lm.params, lm.task, lm.eval_fn, eval_every=eval_every, schedule=c.ray.schedule,
                   worker_options={"num_cpus": c.ray.worker_cpus}, server_options={"num_cpus": c.ray.server_cpus},
                   replace_lost_workers=c.ray.replace_lost_workers, emulate_speed=c.ray.emulate_speed,
                   timeout=c.ray.timeout_s or None, checkpoint_every=max(1, c.ray.checkpoint_every),
                   checkpoint_dir=os.path.join(os.path.abspath(workdir), "server_checkpoints")
                   if c.ray.checkpoint_every > 0 else None)


def main(argv):
    common.start(argv)
    c = _CONFIG.value
    if c.backend not in BACKENDS:
        raise ValueError(f"config.backend={c.backend!r} must be one of {BACKENDS}")
    lsgd = LocalSGDConfig.from_dict({**c.local_sgd.to_dict(), "seed": c.seed})
    lm_cfg = lm_task.CorpusLMConfig.from_dict(c.model.to_dict(), c.lm.to_dict())
    started = time.time()
    lm = lm_task.build(lm_cfg, lm_task.corpus_splits(lm_cfg), lsgd, c.seed)
    params, history = _train(c, lsgd, lm, _WORKDIR.value)
    test_loss = lm.test_fn(params)
    result = {"config": c.to_dict(), "history": history.to_dict(), "pretrain_loss": lm.pretrain_loss,
              "test_loss": test_loss, "test_perplexity": math.exp(test_loss), "wall_seconds": time.time() - started}
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    clock = "wall-clock" if c.backend == "ray" and c.ray.schedule == "live" else "simulated"
    print(f"{c.backend} {lsgd.mode}/{lsgd.outer}{'+dylu' if lsgd.dylu else ''}: {history.version[-1]} outer updates, "
          f"{history.local_steps[-1]} local steps, {history.time[-1]:.1f} s {clock}, "
          f"val loss {history.eval_loss[0]:.4f} -> {history.eval_loss[-1]:.4f}, test loss {test_loss:.4f} "
          f"(ppl {math.exp(test_loss):.2f}), {len(history.rejections)} refused pushes, "
          f"{result['wall_seconds']:.0f} s wall")


if __name__ == "__main__":
    common.run(main)
