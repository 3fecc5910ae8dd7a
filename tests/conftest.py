"""Fixtures shared by several test modules: one torch thread, a tiny random CLIP, and no
background decoder export outliving its test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from samkit.engine.web_decoder import EXPORT_THREAD_PREFIX


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of small models (restored afterwards): on a shared 2-core
    machine a second OpenMP thread mostly spins waiting for a descheduled peer, which made
    such runs up to 10x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ a tiny CLIP
WORDS = "abcdefghijklmnopqrstuvwxyz"


def tiny_vocab() -> dict[str, int]:
    """Single letters (no merges), then the special tokens last: as in OpenAI's vocab, the
    end-of-text token has the highest id, which is where CLIP pools the text."""
    vocab: dict[str, int] = {}
    for c in WORDS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP in the Hugging Face layout (config.json, model.safetensors,
    tokenizer files), as ``save_pretrained`` writes it."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    vocab = tiny_vocab()
    torch.manual_seed(0)
    # 64-wide heads like OpenAI's; eos_token_id 2 is the legacy value OpenAI's hub configs
    # carry, which makes transformers pool at the highest token id.
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 1,
                     "max_position_embeddings": 16, "eos_token_id": 2,
                     "bos_token_id": len(vocab) - 2, "pad_token_id": len(vocab) - 1},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 1, "image_size": 32, "patch_size": 8},
        projection_dim=24)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def no_decoder_export_outlives_its_test() -> Iterator[None]:
    """Wait for the annotation app's background decoder exports (samkit.engine.web_decoder)
    a test started: torch.export's tracing state is process-global, and a later test's
    torch.manual_seed racing an export still running raised KeyError inside torch.fx."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith(EXPORT_THREAD_PREFIX):
            thread.join(timeout=300)

