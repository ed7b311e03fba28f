"""Shared fixtures: tiny random models of several architectures, and the embedded model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import steerkit as sk  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY = dict(hidden=32, layers=3, heads=4, kv_heads=2, ffn=64, ctx=128)


def tiny_config(model_type: str, vocab_size: int, **sizes):
    """A 3-block, 32-wide config of ``model_type`` (no download); ``sizes`` overrides entries of ``TINY``."""
    size = {**TINY, **sizes}
    h, n, a, kv, f, ctx = (size[k] for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "ctx"))
    common = dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=f, num_hidden_layers=n)
    common.update(num_attention_heads=a, max_position_embeddings=ctx)
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=n, n_head=a, n_positions=ctx)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(**common)
    if model_type == "phi3":
        return transformers.Phi3Config(**common, num_key_value_heads=kv, pad_token_id=0)
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    tied = {"tie_word_embeddings": True} if model_type == "llama" else {}  # SmolLM2 ties; the others do not
    return classes[model_type](**common, num_key_value_heads=kv, head_dim=h // a, **tied)


ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded model's float32 checkpoint (converted once, then cached)."""
    return sk.embedded_checkpoint()


@pytest.fixture(scope="session")
def tok(embedded_dir):
    """The embedded model's tokenizer (49152 tokens), shared by the tiny models."""
    return AutoTokenizer.from_pretrained(embedded_dir)


_tiny_cache: dict = {}


def make_tiny(model_type: str, vocab_size: int, seed: int = 0):
    key = (model_type, vocab_size, seed)
    if key not in _tiny_cache:
        torch.manual_seed(seed)
        config = tiny_config(model_type, vocab_size)
        _tiny_cache[key] = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return _tiny_cache[key]


@pytest.fixture(params=ARCHS)
def tiny(request, tok):
    """A tiny random model of each architecture."""
    return make_tiny(request.param, len(tok))


@pytest.fixture
def tiny_llama(tok):
    return make_tiny("llama", len(tok))


@pytest.fixture(scope="session")
def smollm(embedded_dir):
    """The embedded SmolLM2-135M-Instruct, loaded once per session."""
    return sk.load_model("smollm2-135m-instruct")


TEXTS = [
    "The cat sat on the mat.",
    "Hello",
    "A much longer sentence that goes on and on about nothing in particular at all.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
]


@pytest.fixture(scope="session")
def default_corpus():
    """The embedded offline corpus (built once, about 20 s, then cached)."""
    from steerkit.data.corpus import load_corpus

    return load_corpus("default")
