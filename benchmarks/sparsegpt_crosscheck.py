"""Cross-check: `sd2_utils.prune` SparseGPT against llm-compressor's SparseGPTModifier.

Both prune the same SmolLM2-135M-Instruct copy (optionally cut to its first `--num-layers`
decoder layers) to 50% unstructured sparsity on the same ShareGPT calibration samples, with
dampening 0.01 and blocks of 128 columns. The script then compares the sparsity and the
relative reconstruction error ``||(W - W')X||^2 / ||WX||^2`` of each pruned linear layer. ``X``
are the dense model's inputs to that layer, the same for both runs, so the errors are
comparable. Held-out perplexity and run time are recorded too. Results: ``results/sparsegpt_crosscheck.json``.

llm-compressor 0.14 requires ``transformers<=5.17``, older than this project's, so it is not a
project dependency. Install it into a separate folder and pass that folder:

    .venv/bin/pip install --target /tmp/llmc --no-deps llmcompressor==0.14.0.1 \
        transformers==5.17.0 compressed-tensors==0.19.0 huggingface_hub==1.33.0 \
        auto-round==0.15.1 loguru nvidia-ml-py py-cpuinfo httpx httpcore h11 anyio sniffio
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparsegpt_crosscheck.py --llmcompressor-path /tmp/llmc

The llm-compressor run happens in a child process with that folder first on ``PYTHONPATH``, so
it uses transformers 5.17 beside this environment's torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sd2_utils import adapter, calibration, prune, sparsity  # noqa: E402
from sd2_utils.io import atomic_write_json  # noqa: E402
from sd2_utils.layer_prune import remove_layers  # noqa: E402
from sd2_utils.models import load_model  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results" / "sparsegpt_crosscheck.json"

# Child process: prune with llm-compressor and save the model.
LLMCOMPRESSOR_SCRIPT = r"""
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

model_dir, samples_path, out = sys.argv[1:4]
samples = torch.load(samples_path)
dataset = Dataset.from_list([{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
recipe = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", dampening_frac=0.01, block_size=128,
                           targets=[r"re:.*layers\.\d+\..*_proj$"], ignore=["lm_head"])
started = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(samples),
        max_seq_length=len(samples[0]))
seconds = time.perf_counter() - started
model.save_pretrained(out)
json.dump({"seconds": seconds, "llmcompressor": __import__("llmcompressor").__version__,
           "transformers": __import__("transformers").__version__}, open(out + "/run.json", "w"))
"""


@torch.no_grad()
def dense_hessians(model, samples) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` of every decoder linear layer's input, from one dense forward pass."""
    linears = adapter.decoder_linear_layers(model)
    hessians = {name: torch.zeros(linear.in_features, linear.in_features) for name, linear in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def make_hook(name):
        def hook(module, args):
            counts[name] = sparsity.accumulate_hessian(hessians[name], args[0], counts[name])

        return hook

    handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
    for sample in samples:
        model(input_ids=sample[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return hessians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmcompressor-path", required=True, help="folder with llm-compressor installed (--target)")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers (default all)")
    parser.add_argument("--num-calibration-samples", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--num-heldout-samples", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer = load_model(MODEL_ID)
    if args.num_layers is not None:
        remove_layers(model, range(args.num_layers, len(adapter.decoder_layers(model))))
    samples, heldout, record = calibration.build_calibration(
        "sharegpt", tokenizer, args.num_calibration_samples, args.max_seq_length,
        num_heldout_samples=args.num_heldout_samples)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model.save_pretrained(scratch / "dense")
        tokenizer.save_pretrained(scratch / "dense")  # llm-compressor loads it with the data set
        torch.save(samples, scratch / "samples.pt")
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", LLMCOMPRESSOR_SCRIPT, str(scratch / "dense"), str(scratch / "samples.pt"),
             str(scratch / "llmc")],
            env={**os.environ, "PYTHONPATH": args.llmcompressor_path}, check=True,
        )
        llmc_wall = time.perf_counter() - started
        llmc_run = json.loads((scratch / "llmc" / "run.json").read_text())
        from safetensors.torch import load_file

        llmc_state = {}
        for path in sorted((scratch / "llmc").glob("*.safetensors")):
            llmc_state.update(load_file(str(path)))

    dense_hessian = dense_hessians(model, samples)
    dense_perplexity = calibration.perplexity(model, heldout)

    started = time.perf_counter()
    results = prune.prune_model(model, samples, prune.resolve_settings("sparsegpt", 0.5))
    sd2_seconds = time.perf_counter() - started
    sd2_perplexity = calibration.perplexity(model, heldout)
    sd2_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    model.load_state_dict({**dense_state, **{name: llmc_state[name] for name in dense_state if name in llmc_state}})
    llmc_perplexity = calibration.perplexity(model, heldout)

    layers = {}
    for name in results:
        key = f"{name}.weight"
        dense_weight = dense_state[key]
        layers[name] = {
            "sd2_sparsity": float((sd2_state[key] == 0).float().mean()),
            "llmcompressor_sparsity": float((llmc_state[key] == 0).float().mean()),
            "sd2_error": sparsity.reconstruction_error(dense_weight, sd2_state[key], dense_hessian[name]),
            "llmcompressor_error": sparsity.reconstruction_error(dense_weight, llmc_state[key], dense_hessian[name]),
            "mask_agreement": float(((sd2_state[key] == 0) == (llmc_state[key] == 0)).float().mean()),
        }
    mean = lambda field: sum(entry[field] for entry in layers.values()) / len(layers)  # noqa: E731
    result = {
        "model": MODEL_ID,
        "num_layers": len(adapter.decoder_layers(model)),
        "calibration": record,
        "num_heldout_samples": len(heldout),
        "sd2_seconds": round(sd2_seconds, 1),
        "llmcompressor_seconds": round(llmc_run["seconds"], 1),
        "llmcompressor_wall_seconds_with_load": round(llmc_wall, 1),
        "runtime_ratio_sd2_over_llmcompressor": round(sd2_seconds / llmc_run["seconds"], 3),
        "mean_sd2_sparsity": mean("sd2_sparsity"),
        "mean_llmcompressor_sparsity": mean("llmcompressor_sparsity"),
        "mean_sd2_error": mean("sd2_error"),
        "mean_llmcompressor_error": mean("llmcompressor_error"),
        "mean_mask_agreement": mean("mask_agreement"),
        "perplexity": {"dense": dense_perplexity, "sd2": sd2_perplexity, "llmcompressor": llmc_perplexity},
        "versions": {**prune.library_versions(), "llmcompressor": llmc_run["llmcompressor"],
                     "llmcompressor_transformers": llmc_run["transformers"]},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "layers": layers,
    }
    atomic_write_json(RESULTS, result)
    print(json.dumps({key: value for key, value in result.items() if key != "layers"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
