"""CPO mini-reproduction on the toy translation task with gilded references (see README.md).

  python -m experiments.cpo.run --config=experiments/cpo/config.py --workdir=/tmp/jaxllm_cpo

Any field can be overridden, e.g. `--config.seeds=0,1 --config.arm_steps=100`.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # Task: 40-word dictionary, modifier-before-head reordering, 4-10 word sources; 30 % of the references
    # carry one dropped or substituted word.
    c.task = dict(n_heads=24, n_modifiers=16, min_words=4, max_words=10, modifier_prob=0.4,
                  reference_error_rate=0.3, drop_prob=0.5, lexicon_seed=0)
    # Disjoint source splits, the same for every seed: SFT start, pair building, lr selection, test.
    c.split_seed = 1234
    c.splits = dict(sft=2000, pairs=2000, val=300, test=600)
    # The stronger system of each triplet (plays GPT-4): the true mapping with one error in this share of
    # sentences. The weaker system (plays ALMA-13B-LoRA): "policy" = the SFT start itself, greedy;
    # "synthetic" = the true mapping with one error in `weak_error_rate` of the sentences.
    c.strong_error_rate = 0.1
    c.weak_system = "policy"
    c.weak_error_rate = 0.25
    c.model = dict(preset="tiny", vocab_size=96, max_len=32)  # d_model 64, 2 layers, 0.12M params
    c.seq_len = 24
    c.batch_size = 32  # pairs (or SFT rows) per step
    c.sft_start = dict(steps=400, learning_rate=3e-3, warmup_steps=20)
    c.arm_steps = 150  # every arm, from the SFT start
    c.arm_warmup_steps = 10
    # Learning rates tried per arm on the val split with seed `seeds[0]` (prefer-only / NLL-only keep CPO's).
    c.lr_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    c.beta = 0.1
    c.cpo_beta_sweep = (0.03, 0.3, 1.0)  # extra CPO runs at CPO's lr, first seed only (reported separately)
    c.seeds = (0, 1, 2)
    c.bootstrap_samples = 2000
    c.max_new_tokens = 14
    return c
