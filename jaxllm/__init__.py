"""jaxllm: Llama-family models, training, serving and eight January-2024 LLM methods as
composable transforms in JAX/Flax (see README.md).

Shape letters. Arrays in numeric code carry their axes as a suffix (`x_BTD`, `logits_BTV`,
`wq_DHK`); one letter has one meaning project-wide:

    B  batch rows                          T  tokens (queries; all tokens of a ragged pass)
    C  keys a query attends to (context)   D  model width
    H  query heads                         G  key/value heads
    R  query heads per KV head (H = G·R)   K  head width
    V  vocabulary                          F  MLP width
    S  sequences (slots) of a ragged pass  N  blocks of the paged KV pool
    P  tokens per pool block               W  block-table width (blocks per sequence)
    J  history tiles, Q tokens per tile    A  candidates kept by the top-k/top-p prefilter
    M  members of a model ensemble         L  layers (a stacked leading axis)
    X  any leading axes

A preference batch stacks chosen and rejected rows along B (B = 2 × pairs); a count of steps
is a plain name (`steps`), never a shape letter.
"""

__version__ = "0.1.0"
