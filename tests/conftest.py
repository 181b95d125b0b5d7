"""Shared fixtures: model names and offline mode for every test."""

import os

import pytest

# Tests never reach the network; the Makefile sets this too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_ID = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
QWEN_DRAFT_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA_ID = "google/gemma-3-270m"


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct in fp32 with its tokenizer, loaded once per session."""
    from sd2_utils.models import load_model

    return load_model(SMOLLM_ID)
