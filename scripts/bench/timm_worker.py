"""The plain timm + torch baseline, the loop of timm's train.py without Accelerate; no finetune import.

    python timm_worker.py JOB.json RESULT.json

JOB.json (written by the harness) names image folders (split/<label>/<n>.png or .jpg), the label names, a timm
model folder (the same pretrained backbone, saved with save_for_hf) and the settings. What a timm user writes:
create_model("local-dir:..."), create_dataset over the folders, create_transform, create_loader-style DataLoaders,
create_optimizer_v2, timm's schedulers, losses, Mixup and ModelEmaV3, evaluation every epoch keeping the best.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _since_process_start() -> float:
    """Seconds since this worker process was created (psutil), as the kit's metrics.json counts its start-up."""
    import psutil

    return time.time() - psutil.Process().create_time()


def main(job_path: str, result_path: str) -> None:
    import timm
    import torch
    from safetensors.torch import load_file, save_file
    from sklearn.metrics import accuracy_score, f1_score
    from timm.data import Mixup, create_dataset, create_transform
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.models import save_for_hf
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
    from timm.utils import ModelEmaV3, random_seed
    from torch.utils.data import DataLoader

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    names = job["labels"]
    class_map = {name: i for i, name in enumerate(names)}
    random_seed(job["seed"])
    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    notes = []

    model = timm.create_model(f"local-dir:{job['model']}", pretrained=job["pretrained"], num_classes=len(names),
                              drop_rate=job["drop_rate"], drop_path_rate=job["drop_path_rate"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    channels_last = job["channels_last"]
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train_tf = create_transform(**job["train_transform"], is_training=True)
    eval_tf = create_transform(**job["eval_transform"], is_training=False)
    mixup = None
    if job["mixup"] > 0 or job["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=job["mixup"], cutmix_alpha=job["cutmix"], label_smoothing=job["label_smoothing"],
                      num_classes=len(names))
    workers = job["num_workers"]

    def loader(split, transform, batch_size, training):
        dataset = create_dataset("", root=job["folders"][split], class_map=class_map, transform=transform)
        return DataLoader(dataset, batch_size=batch_size, shuffle=training,
                          generator=torch.Generator().manual_seed(job["seed"]), num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                          drop_last=training and mixup is not None)

    train_loader = loader("train", train_tf, job["batch_size"], True)
    val_loader = loader("validation", eval_tf, job["eval_batch_size"], False)
    test_loader = loader("test", eval_tf, job["eval_batch_size"], False) if job["folders"].get("test") else None

    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    elif job["label_smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=job["label_smoothing"])
    else:
        criterion = torch.nn.CrossEntropyLoss()
    eval_criterion = torch.nn.CrossEntropyLoss()

    kwargs = {"fused": True} if job.get("fused") else {}
    optimizer = create_optimizer_v2(model, "adamw", lr=job["lr"], weight_decay=job["weight_decay"], **kwargs)
    warmup, total_steps = job["warmup_steps"], job["total_steps"]
    sched_args = dict(warmup_t=warmup, warmup_prefix=True, warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False)
    decay_steps = max(1, total_steps - warmup)
    if job["scheduler"] == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=decay_steps, **sched_args)
    elif job["scheduler"] == "linear":
        scheduler = PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, **sched_args)
    else:
        scheduler = StepLRScheduler(optimizer, decay_t=10**9, decay_rate=1.0,
                                    **{k: v for k, v in sched_args.items() if k != "lr_min"})
    ema = ModelEmaV3(model, decay=job["ema_decay"], use_warmup=True) if job.get("ema_decay") else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job["precision"])
    scaler = torch.amp.GradScaler("cuda") if job["precision"] == "fp16" else None

    def forward(module, x):
        if amp_dtype is None:
            return module(x)
        with torch.autocast(device.type, dtype=amp_dtype):
            return module(x)

    def to_device(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y

    def scores_of(logits, labels):
        predicted = logits.argmax(-1).numpy()
        return {"loss": float(eval_criterion(logits, labels)),
                "accuracy": float(accuracy_score(labels.numpy(), predicted)),
                "f1_macro": float(f1_score(labels.numpy(), predicted, average="macro", zero_division=0))}

    @torch.no_grad()
    def validate(module, loader_):
        module.eval()
        logits, labels = [], []
        for x, y in loader_:
            x, y = to_device(x, y)
            logits.append(forward(module, x).float().cpu())
            labels.append(y.cpu())
        return scores_of(torch.cat(logits), torch.cat(labels))

    def better(metric, new, old):
        return old is None or (new < old if metric == "loss" else new > old)

    select, patience = job["select_best"], job.get("early_stopping_patience")
    grad_accum, max_steps = job["grad_accum"], job.get("max_steps")
    history, best, stale, step = [], None, 0, 0
    train_seconds, train_samples = 0.0, 0
    start_up = _since_process_start()  # process start to the training loop
    for epoch in range(1, job["epochs"] + 1):
        model.train()
        total_loss, batches, samples = torch.zeros((), device=device), 0, 0
        n_batches = len(train_loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            x, y = to_device(x, y)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            loss = criterion(forward(model, x).float(), target)
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            if (i + 1) % grad_accum == 0 or i + 1 == n_batches:
                if scaler:
                    scaler.unscale_(optimizer)
                if job["max_grad_norm"] is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), job["max_grad_norm"])
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
            total_loss += loss.detach()
            batches += 1
            samples += len(y)
            if max_steps and step >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        train_seconds += seconds
        train_samples += samples
        validation = validate(model, val_loader)
        entry = {"epoch": epoch, "loss": float(total_loss / max(batches, 1)), "validation": validation}
        if ema is not None:
            entry["validation_ema"] = validate(ema.module, val_loader)
        history.append(entry)
        for use_ema, scores in ((False, validation), (True, entry.get("validation_ema"))):
            if scores is not None and (best is None or better(select, scores[select], best[select])):
                best = {"epoch": epoch, "ema": use_ema, **scores}
                state = (ema.module if use_ema else model).state_dict()
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "best.safetensors"))
        # timm train.py's CheckpointSaver keeps the last epoch's full state too (model, optimizer, EMA)
        torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "state_dict_ema": ema.module.state_dict() if ema is not None else None}, out / "last.pth.tar")
        print(f"epoch {epoch}: train loss {entry['loss']:.4f} | validation {validation} | "
              f"{samples / seconds:.1f} images/s", flush=True)
        if patience:
            previous = None
            for e in history[:-1]:
                if better(select, e["validation"][select], previous):
                    previous = e["validation"][select]
            stale = 0 if better(select, validation[select], previous) else stale + 1
            if stale >= patience:
                notes.append(f"the baseline stopped early after epoch {epoch}")
                break
        if max_steps and step >= max_steps:
            break
    model.load_state_dict(load_file(str(out / "best.safetensors")))
    test = None
    if test_loader is not None:
        scores = validate(model, test_loader)
        test = {"accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"]}
    save_for_hf(model, out / "model", model_config={"label_names": list(names)}, safe_serialization=True)
    if not kwargs:
        notes.append(f"the baseline's optimizer is timm's default AdamW (fused={optimizer.defaults.get('fused')}); "
                     "the kit builds it with fused=True; --baseline-fused gives both the fused kernel")
    result = {
        "start_up_seconds": start_up,
        "rows": {k: sum(1 for f in Path(v).rglob("*") if f.suffix.lower() in get_img_extensions()) if v else None
                 for k, v in job["folders"].items()},
        "labels": names,
        "test": test,
        "train_samples_per_second": train_samples / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "train_samples": train_samples,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "epochs": history,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                     f"(fused={optimizer.defaults.get('fused')}, foreach={optimizer.defaults.get('foreach')})",
        "scheduler": f"timm {type(scheduler).__name__}",
        "warmup_steps": warmup,
        "total_steps": total_steps,
        "precision": job["precision"],
        "device": str(device),
        "num_workers": workers,
        "notes": notes,
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
