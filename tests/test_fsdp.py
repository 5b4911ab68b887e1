"""The shard-safe helpers (finetune.checkpoints: full_state_dict, load_full_state_dict, skeleton,
rebuild_unsharded) on a model really sharded by torch's own FSDP2 `fully_shard`, in two CPU processes over gloo
(accelerate will not shard on a CPU, so the kit's training path under FSDP is not run here; these are the calls it
makes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import subprocess_env

WORKER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer, BertForSequenceClassification

    from finetune.checkpoints import full_state_dict, is_sharded, load_full_state_dict, rebuild_unsharded, skeleton
    from finetune.tasks.text_classification.model import save_model

    bert, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(bert, num_labels=3).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    template = skeleton(model)  # before sharding, as train() takes it
    tokenizer = AutoTokenizer.from_pretrained(bert)
    batch = tokenizer(["the bread of today", "a goal and news", "very chip story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        unsharded_logits = model(**batch).logits
    assert not is_sharded(model)
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert is_sharded(model)
    shards = [p for p in model.parameters() if isinstance(p, DTensor)]
    assert shards and all(p.to_local().numel() < p.numel() for p in shards if p.shape[0] >= 2)

    # 1. gathered == the unsharded model's state dict
    gathered = full_state_dict(model)
    if rank == 0:
        assert set(gathered) >= {k for k, _ in model.named_parameters()}, set(gathered) ^ set(reference)
        for key, value in gathered.items():
            assert not isinstance(value, DTensor) and value.device.type == "cpu", key
            assert torch.equal(value, reference[key]), key

    # 2. a full state dict (only rank 0 holds it) loaded into the sharded model: every shard takes the new values
    generator = torch.Generator().manual_seed(7 + rank)  # rank 1 draws other numbers: they must not be used
    new = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
           for k, v in reference.items()}
    load_full_state_dict(model, new if rank == 0 else {}, main_process=rank == 0)
    expected = [None]
    if rank == 0:
        expected = [new]
    dist.broadcast_object_list(expected, src=0)
    expected = expected[0]
    changed = 0
    for name, p in model.named_parameters():
        whole = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        assert torch.equal(whole, expected[name]), name
        changed += not torch.equal(whole, reference[name])
    assert changed == len(list(model.parameters())), changed
    with torch.no_grad():
        sharded_logits = model(**batch).logits

    # 3. export from the sharded model: a plain model on rank 0, saved in transformers' own format
    state = full_state_dict(model)
    if rank == 0:
        plain = rebuild_unsharded(template, model, state)
        assert not is_sharded(plain) and not any(p.is_meta for p in plain.parameters())
        save_model(plain, tokenizer, out / "model", None, None)
        with torch.no_grad():
            plain_logits = plain.eval()(**batch).logits
        json.dump({"unsharded": unsharded_logits.tolist(), "sharded": sharded_logits.tolist(),
                   "plain": plain_logits.tolist(), "changed": changed}, open(out / "result.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_state_dicts_and_export_of_a_model_sharded_by_fully_shard(tiny_bert, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    import finetune

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(tiny_bert), str(tmp_path)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads((tmp_path / "result.json").read_text())
    unsharded, sharded, plain = (torch.tensor(found[k]) for k in ("unsharded", "sharded", "plain"))
    assert not torch.allclose(unsharded, sharded)  # the loaded weights are in use ...
    assert torch.allclose(sharded, plain, atol=1e-5)  # ... and the exported model computes what the sharded one did

    # the exported folder loads with transformers alone and through finetune, and predicts as the sharded model did
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    batch = tokenizer(["the bread of today", "a goal and news", "very chip story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        native = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()(**batch).logits
        kit_model, _, _ = finetune.load(tmp_path / "model")
        kit = kit_model(**batch).logits
    assert torch.allclose(native, sharded, atol=1e-5)
    assert torch.allclose(kit, sharded, atol=1e-5)
