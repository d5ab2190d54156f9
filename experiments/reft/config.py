"""ReFT mini-reproduction config (see README.md): SFT warm-up → ReFT → evaluation on generated
arithmetic word problems, with a character-level tiny Llama.

  nice -n 10 python -m launch.reft --config=experiments/reft/config.py --workdir=/tmp/jaxllm_reft --stage=all
  nice -n 10 python -m experiments.reft.run --config=experiments/reft/config.py:mini --workdir=/tmp/jaxllm_reft_exp

`:mini` is the size that fits the shared 2-core CPU in well under an hour (fewer problems, epochs
and RL epochs); the default is the spec's size (2K training problems, 30 SFT epochs).

Any field can be overridden, e.g. `--config.reft.kl_coef=0 --config.seed=1`.
"""
import ml_collections


def get_config(size=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.seeds = (0, 1, 2)  # experiments.reft.run
    # Task: N-CoT ("ncot") or P-CoT ("pcot", programs scored in the sandbox). Train/val share template
    # combinations (val has unseen questions); test uses held-out combinations, reported once.
    c.task = dict(style="ncot", train=2000, val=200, test=400, split_seed=1234)
    # ~0.1M params, 45-char vocabulary; prompts ≤ 64 chars, responses ≤ 64 chars.
    c.model = dict(preset="tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192,
                   max_len=128)
    c.mesh = "fsdp:1"
    # One SFT run: warm-up = epoch `warmup_epochs`, SFT-best = best validation greedy accuracy.
    c.sft = dict(epochs=30, batch_size=32, learning_rate=3e-3, warmup_epochs=2)
    # ReFT (jaxllm.methods.reft.ReFTConfig); lr ≫ the paper's 3e-7 at this scale.
    c.reft = dict(kl_coef=0.05, gamma=1.0, lam=0.95, clip=0.2, value_clip=0.2, vf_coef=5.0, ppo_epochs=2,
                  rollout_questions=32, minibatch=32, learning_rate=3e-5, grad_clip=1.0, temperature=1.0,
                  max_prompt_len=64, max_total_len=128, partial_reward=0.1, shared_value_trunk=True,
                  truncated_reward="score", reduction="sequence_mean", rl_epochs=3)
    c.eval_k = 8  # samples per question for voting@k / pass@k (0: greedy only)
    if size == "mini":
        c.task.update(train=640, val=64, test=128)
        c.sft.update(epochs=12, warmup_epochs=2)
        c.reft.update(rl_epochs=2, learning_rate=1e-4)
        c.eval_k = 4
    elif size is not None:
        raise ValueError(f"unknown config size {size!r}; known: 'mini'")
    return c
