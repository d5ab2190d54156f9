"""Training: state and jitted step, optimizer, LM objective, checkpoints, the one `fit` loop.

    state.py       TrainState, init_state
    step.py        make_train_step(loss_fn, optimizer, mesh, grad_accum=...)
    optim.py       OptimizerConfig, make_optimizer (AdamW + warmup/cosine + clipping)
    config.py      TrainConfig, DataConfig, config_dict (through the one bridge, jaxllm.configs)
    lm.py          lm_loss_fn (packed-batch NLL)
    mfu.py         peak FLOP/s of the devices (the MFU denominator)
    checkpoint.py  Checkpointer (orbax, verified restore with fallback)
    metrics.py     metrics.jsonl + TensorBoard + progress line
    loop.py        fit(loss_fn, optimizer, batches, init_or_params, workdir, LoopConfig, hooks=...)
                   -> FitResult: the one training loop every method calls
    hooks.py       fit hooks: sample_hook (end-of-training sample through jaxllm.serve.Engine)
    pretrain.py    pretrain(TrainConfig, workdir): the pre-training caller of fit
    finetune.py    finetune(loss_fn, model, rows, ...): the fine-tuning caller of fit (SFT, DPO/CPO, ChatQA,
                   context extension)
    aot.py         ahead-of-time compilation of the step for TPU topologies

The names below are importable from `jaxllm.train` directly; they load on first use, so importing
`jaxllm.train.step` does not pull in the data pipeline.
"""
import importlib

_EXPORTS = {
    "TrainState": "state", "init_state": "state",
    "make_train_step": "step",
    "OptimizerConfig": "optim", "make_optimizer": "optim",
    "TrainConfig": "config", "DataConfig": "config", "config_dict": "config",
    "lm_loss_fn": "lm",
    "Checkpointer": "checkpoint",
    "fit": "loop", "FitResult": "loop", "LoopConfig": "loop",
    "pretrain": "pretrain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxllm.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxllm.train.{_EXPORTS[name]}"), name)
