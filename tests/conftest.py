"""Session-wide fixtures: the real model and tokenizer are loaded once per test session."""

import os

import pytest

os.environ.setdefault("PDMESH_TORCH_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_config():
    from engine.config import ModelConfig
    return ModelConfig.tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from engine.weights import load_model
    return load_model(tiny_config)


@pytest.fixture(scope="session")
def real_config():
    from engine.config import ModelConfig
    return ModelConfig()


@pytest.fixture(scope="session")
def real_model(real_config):
    from engine.weights import load_model
    return load_model(real_config)


@pytest.fixture(scope="session")
def tokenizer():
    from engine.tokenizer import load_tokenizer
    return load_tokenizer()
