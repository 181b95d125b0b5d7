"""What `00_setup` shows: library versions, each model of a profile, each data set."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time

import torch

from . import data, models

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "datasets", "accelerate", "gguf", "safetensors",
             "papermill", "matplotlib", "seaborn")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["cpu_threads"] = str(torch.get_num_threads())
    return versions


def model_summary(name: str, prompt: str, max_new_tokens: int = 24) -> dict:
    """Load a model and describe it, with one short greedy answer to `prompt`.

    Models without a chat template (base models such as Gemma-3-270M) get the raw prompt.
    """
    started = time.perf_counter()
    model, tokenizer = models.load_model(name)
    load_seconds = time.perf_counter() - started
    config = model.config.get_text_config()
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt_text = prompt
    inputs = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    summary = {
        "model": name,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "has_chat_template": bool(tokenizer.chat_template),
        "prompt_text": prompt_text,
        "greedy_answer": answer,
        "load_seconds": round(load_seconds, 1),
    }
    del model
    return summary


def dataset_summaries(sharegpt_samples: int = 3, seed: int = 0) -> dict[str, dict]:
    """Count each data set and show its categories and a few first prompts."""
    loaders = {
        "sharegpt": lambda: data.load_sharegpt(),
        "spec_bench": data.load_spec_bench,
        "mt_bench": data.load_mt_bench,
        "gsm8k_train": lambda: data.load_gsm8k("train"),
        "gsm8k_test": lambda: data.load_gsm8k("test"),
        "humaneval": data.load_humaneval,
    }
    summaries = {}
    for name, loader in loaders.items():
        dataset = loader()
        sample = dataset.shuffle(seed=seed).select(range(min(sharegpt_samples, len(dataset))))
        categories = {}
        for category in dataset["category"]:
            categories[category] = categories.get(category, 0) + 1
        summaries[name] = {
            "rows": len(dataset),
            "categories": categories,
            "examples": [turns[0]["content"][:200] for turns in sample["turns"]],
        }
    return summaries
