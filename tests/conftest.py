"""Suite-wide setup: 8 fake CPU devices (sharding tests) and a persistent compilation cache."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed for AOT tests, must not grab a backend
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
