"""Toy self-rewarding run (`launch/self_rewarding.py`, `experiments/self_rewarding/run.py`)."""
from jaxllm.methods.self_rewarding import toy


def get_config():
    config = toy.config_dict()
    config.init_model = ""
    return config
