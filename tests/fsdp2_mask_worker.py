"""One process of the FSDP2 fixed-mask test (`test_finetune.py`), started by torchrun.

accelerate 1.16 enables FSDP only on GPUs, so ``Trainer`` cannot shard a model on CPU. This
worker shards the draft with torch's own ``fully_shard`` over gloo instead and drives the
fixed-mask callback through the hooks that ``Trainer`` calls. The parameters are then DTensor
shards, as under ``accelerate launch`` with ``configs/accelerate/fsdp.yaml``.

Usage: ``torchrun --nproc_per_node 2 fsdp2_mask_worker.py DRAFT_DIR OUT_DIR MODE``, where MODE
is ``masked`` (the callback keeps the mask fixed) or ``unmasked`` (the callback is left out, as a
control that the optimizer does move pruned weights). Each rank writes ``OUT_DIR/rank-R.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from sd2_utils import adapter, finetune, prune

STEPS = 3


def main(draft: Path, out: Path, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32)
    keep = prune.load_masks(draft)
    for layer in adapter.decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    modules = dict(model.named_modules())
    before = {name: modules[name].weight.full_tensor().clone() for name in keep}

    callback = finetune._make_trainer_callback()(keep) if mode == "masked" else None
    if callback is not None:
        callback.on_train_begin(None, None, None, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 1000, (1, 32))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if callback is not None:
            callback.on_pre_optimizer_step(None, None, None)
        optimizer.step()
        if callback is not None:
            callback.on_optimizer_step(None, None, None)
        optimizer.zero_grad()
        losses.append(loss.item())

    violations = changed = 0
    for name, mask in keep.items():
        weight = modules[name].weight
        full = weight.full_tensor()
        violations += int((full[~mask] != 0).sum())
        changed += int((full[mask] != before[name][mask]).sum())
    sample = modules[next(iter(keep))].weight
    result = {
        "world_size": dist.get_world_size(),
        "parameter_type": type(sample).__name__,
        "sharded_by_rows": [placement.is_shard(dim=0) for placement in sample.placements],
        "local_rows": sample.to_local().shape[0],
        "full_rows": sample.shape[0],
        "losses": losses,
        "violations": violations,
        "changed": changed,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
