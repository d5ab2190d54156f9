"""jaxllm: Llama-family models, training, serving and eight January-2024 LLM methods as
composable transforms in JAX/Flax (see README.md)."""

__version__ = "0.1.0"
