"""The transformers Trainer baseline, as the transformers docs write text classification; no finetune import.

    python trainer_worker.py JOB.json RESULT.json

JOB.json (written by the harness) names the CSV files (columns text,label), the label names, the model folder and
the settings; this is what a Trainer user writes: datasets.load_dataset("csv"), AutoTokenizer with truncation,
DataCollatorWithPadding, AutoModelForSequenceClassification with id2label, TrainingArguments and Trainer. Metrics
come from scikit-learn (the docs' evaluate.load("accuracy") fetches code from the hub, which fails offline).
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
    import numpy as np
    import torch
    import transformers
    from datasets import ClassLabel, load_dataset
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_warning()
    names = job["labels"]
    label2id = {name: i for i, name in enumerate(names)}
    raw = load_dataset("csv", data_files={k: v for k, v in job["files"].items() if v})
    raw = raw.cast_column("label", ClassLabel(names=names))  # label names to ids, in the job's order

    config = AutoConfig.from_pretrained(job["model"], num_labels=len(names), id2label=dict(enumerate(names)),
                                        label2id=label2id, **job["config"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    set_seed(job["seed"])  # before the head is initialised
    if job["pretrained"]:
        model = AutoModelForSequenceClassification.from_pretrained(job["model"], config=config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    notes = list(job.get("notes", []))  # what the harness knows differs from the kit's run
    if job["freeze_backbone"]:  # a linear probe as a Trainer user writes it: the base model stops training
        for parameter in model.base_model.parameters():
            parameter.requires_grad = False
        notes.append("base model frozen (requires_grad=False); its dropout stays on in train mode, and its "
                     "head reads the standard pooled output (the Trainer's model cannot mean-pool)")

    def preprocess(batch):
        return tokenizer(batch["text"], truncation=True, max_length=job["max_length"])

    tokenized = raw.map(preprocess, batched=True, remove_columns=["text"])

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.argmax(logits, axis=-1)
        return {"accuracy": accuracy_score(prediction.label_ids, predicted),
                "f1_macro": f1_score(prediction.label_ids, predicted, average="macro", zero_division=0)}

    class LoopTimer(TrainerCallback):
        """Time in the training loop only: each epoch's steps, without the evaluation and saving that follow."""

        def __init__(self):
            self.seconds, self.epochs, self._start, self.start_up = 0.0, 0, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_up = _since_process_start()  # process start to the training loop

        def on_epoch_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._start
            self.epochs += 1

    select = job["select_best"]
    out = Path(job["output_dir"])
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["eval_batch_size"],
        num_train_epochs=job["epochs"],
        learning_rate=job["lr"],
        weight_decay=job["weight_decay"],
        lr_scheduler_type=job["scheduler"],
        warmup_steps=job["warmup_steps"],
        gradient_accumulation_steps=job["grad_accum"],
        max_grad_norm=job["max_grad_norm"],
        seed=job["seed"],
        bf16=job["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 without a GPU unless told it is on the CPU
        fp16=job["precision"] == "fp16",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss" if select == "loss" else select,
        greater_is_better=select != "loss",
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        max_steps=job.get("max_steps") or -1,
        **({"optim": job["optim"]} if job.get("optim") else {}),
    )
    timer = LoopTimer()
    callbacks = [timer]
    if job.get("early_stopping_patience"):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=job["early_stopping_patience"]))
    trainer = Trainer(model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                      callbacks=callbacks)
    train_output = trainer.train()

    epochs = []
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            epochs.append({"epoch": round(entry["epoch"]),
                           "validation": {k[5:]: v for k, v in entry.items()
                                          if k.startswith("eval_") and k[5:] in ("loss", "accuracy", "f1_macro")}})
    for entry in trainer.state.log_history:
        if "loss" in entry and "eval_loss" not in entry:
            for row in epochs:
                if row["epoch"] == round(entry["epoch"]):
                    row["loss"] = entry["loss"]
    best_epoch = None
    if trainer.state.best_model_checkpoint:
        best_step = int(trainer.state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
        best_epoch = next((round(e["epoch"]) for e in trainer.state.log_history
                           if "eval_loss" in e and e.get("step") == best_step), None)
    test = None
    if "test" in tokenized:
        prediction = trainer.predict(tokenized["test"])
        scores = compute_metrics(prediction)
        test = {"accuracy": float(scores["accuracy"]), "f1_macro": float(scores["f1_macro"])}
    trainer.save_model(str(out / "model"))  # the kit exports its model too: the same work in the wall time
    samples = len(tokenized["train"]) * timer.epochs
    result = {
        "rows": {k: raw[k].num_rows if k in raw else None for k in ("train", "validation", "test")},
        "labels": names,
        "test": test,
        "train_samples_per_second": samples / timer.seconds if timer.seconds else 0.0,
        "train_seconds": timer.seconds,
        "start_up_seconds": timer.start_up,
        "train_samples": samples,
        "trainer_train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
        "epochs_run": timer.epochs,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "warmup_steps": job["warmup_steps"],
        "precision": job["precision"],
        "device": str(trainer.args.device),
        "frozen_backbone": job["freeze_backbone"],
        "notes": notes,
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
