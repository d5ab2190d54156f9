"""Synthetic task generators used by tests and experiments, one module per task.

A function `fn(rng: numpy.random.Generator) -> dict` that draws one example (str, int, float or
bool values, or lists of them) using only `rng` becomes a local TFDS dataset with
`jaxllm.data.builders.task_dataset(name, fn, num_examples={"train": N}, seed=S)`, which
`jaxllm.data.sources.lm_batches` reads.
"""
