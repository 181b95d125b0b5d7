import dataclasses
import shutil

import pytest
import torch

from sd2_utils import models
from tests.conftest import SMOLLM_ID


def test_resolve_embedded_id_returns_prepared_cache():
    path = models.resolve(SMOLLM_ID)

    assert path == str(models.cache_path(SMOLLM_ID))
    assert models.is_prepared(SMOLLM_ID)


def test_prepare_reuses_existing_cache(monkeypatch):
    models.prepare(SMOLLM_ID)

    def fail(*args, **kwargs):
        raise AssertionError("a prepared model was assembled again")

    monkeypatch.setattr(models, "assemble_gguf", fail)
    assert models.prepare(SMOLLM_ID) == models.cache_path(SMOLLM_ID)


def test_load_model_generates_with_chat_template(smollm):
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert tokenizer.chat_template
    assert model.dtype == torch.float32
    assert "Paris" in answer


def test_prepared_cache_has_no_quantization_config():
    config = (models.cache_path(SMOLLM_ID) / "config.json").read_text()

    assert "quantization_config" not in config
    assert '"dtype": "float32"' in (models.cache_path(SMOLLM_ID) / models.PREPARED_MARKER).read_text()


def test_resolve_unknown_hub_id_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(models.ModelNotAvailableError, match="'meta-llama/Llama-3.2-1B'.*offline"):
        models.resolve("meta-llama/Llama-3.2-1B")


def test_resolve_local_directory_is_returned_as_is(tmp_path):
    assert models.resolve(tmp_path) == str(tmp_path)


def test_assemble_corrupted_copy_fails_checksum(tmp_path, monkeypatch):
    spec = models.EMBEDDED_MODELS[SMOLLM_ID]
    original = models._chunk_files(spec)[0]
    corrupted = tmp_path / "corrupted.gguf"
    shutil.copyfile(original, corrupted)
    with corrupted.open("r+b") as handle:
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(models, "_chunk_files", lambda model: [corrupted])
    destination = tmp_path / "out" / "model.gguf"

    with pytest.raises(models.ChecksumMismatchError, match=f"expected {spec.sha256}.*--force-reinstall"):
        models.assemble_gguf(spec, destination)
    assert not destination.exists()
    assert not list((tmp_path / "out").iterdir())


def test_missing_package_error_names_pip_install():
    spec = dataclasses.replace(
        models.EMBEDDED_MODELS[SMOLLM_ID], packages=("sd2-no-such-package",),
        install_hint="pip install sd2-no-such-package==1.0",
    )

    with pytest.raises(models.ModelNotAvailableError, match="pip install sd2-no-such-package==1.0"):
        models._chunk_files(spec)


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD2_MODEL_CACHE", str(tmp_path))

    def interrupt(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_strip_quantization", interrupt)
    with pytest.raises(KeyboardInterrupt):
        models.prepare(SMOLLM_ID)

    assert not models.is_prepared(SMOLLM_ID)
    assert list(tmp_path.iterdir()) == []


def test_list_models_describes_every_embedded_model():
    rows = {row["model"]: row for row in models.list_models()}

    assert set(rows) == set(models.EMBEDDED_MODELS)
    assert rows[SMOLLM_ID]["prepared"]
    assert rows[SMOLLM_ID]["vocab_size"] == 49152
    assert rows[SMOLLM_ID]["parameters"] == 134515008


def test_parse_dtype_rejects_unknown_name():
    with pytest.raises(ValueError, match="invalid dtype 'float8'"):
        models.parse_dtype("float8")
