"""Shared fixtures: tiny random models built from configs, and a tokenizer made on the spot.

No hub access: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.tiny import (  # noqa: E402
    make_tokenizer,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

# Tiny models run fastest on one thread; two threads on CI's two cores mostly wait on each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Runs in tests (and the commands they start) cache tokens in a folder of the session, not the
    user's cache."""
    old = os.environ.get("ADAPTUNE_TOKEN_CACHE")
    os.environ["ADAPTUNE_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if old is None:
        os.environ.pop("ADAPTUNE_TOKEN_CACHE", None)
    else:
        os.environ["ADAPTUNE_TOKEN_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert_cls():
    return tiny_bert_cls()


@pytest.fixture
def t5():
    return tiny_t5()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer folder, for the CLI; tests that change it work on a copy."""
    path = tmp_path_factory.mktemp("tinyllama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
