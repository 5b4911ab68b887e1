"""Copies of a data file without some of its rows, in the file's own format (`finetune audit --clean`): a csv/tsv or
jsonl file keeps every other record's text as written, json and parquet are read and written back, CoNLL drops whole
sentences, an image folder becomes a csv list of the images kept."""

from __future__ import annotations

import csv
from pathlib import Path

from finetune.errors import FinetuneError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def data_file(spec: str, key: str) -> Path:
    """The file (or folder) a data.* value names; a zoo or hub set has none to copy."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FinetuneError(f"audit: {key} '{spec}' is a zoo or hub set, not a file, and --clean and --finetune copy "
                            "files without some rows; save the set as a csv file and name it in data.train")
    return path


def check_clean_suffix(output: Path, suffix: str) -> None:
    if output.suffix.lower() != suffix:
        raise FinetuneError(f"--clean: {output} must end in {suffix}, the format the copy is written in")


def write_table_without(path: Path, dropped: set, output: Path) -> int:
    """A csv/tsv/jsonl/json/parquet file without the records at the positions in `dropped` (counted as the data
    layer counts them: records after the header, blank lines skipped); returns the records kept."""
    suffix = path.suffix.lower()
    check_clean_suffix(output, suffix)
    if suffix in (".csv", ".tsv", ".jsonl"):
        lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
        if suffix == ".jsonl":
            head, records = [], [(i, i + 1) for i, line in enumerate(lines) if line.strip()]
        else:
            spans = _csv_record_spans(lines, suffix)
            head, records = (lines[: spans[0][1]] if spans else lines), spans[1:]
        kept = [lines[start:end] for i, (start, end) in enumerate(records) if i not in dropped]
        with output.open("w", encoding="utf-8", newline="") as file:
            file.writelines(head)
            for record in kept:
                file.writelines(record)
        return len(kept)
    import pandas as pd

    table = pd.read_parquet(path) if suffix == ".parquet" else pd.read_json(path)
    table = table.drop(index=[i for i in dropped if i in table.index]).reset_index(drop=True)
    if suffix == ".parquet":
        table.to_parquet(output, index=False)
    else:
        table.to_json(output, orient="records", force_ascii=False, indent=1)
    return len(table)


def _csv_record_spans(lines: list[str], suffix: str) -> list[tuple[int, int]]:
    """(first line, line after the last) of every record, the header first; quoted fields span lines."""
    reader = csv.reader(iter(lines), delimiter="\t" if suffix == ".tsv" else ",")
    spans, previous = [], 0
    for record in reader:
        if record:  # a blank line goes with the record after it
            spans.append((previous, reader.line_num))
            previous = reader.line_num
    return spans


def write_conll_without(path: Path, dropped: set, output: Path) -> int:
    """A CoNLL file without the sentences whose first word is on a line in `dropped` (the blank line after each goes
    too); returns the sentences kept."""
    lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    kept, skipping, sentences, inside = [], False, 0, False
    for number, line in enumerate(lines, 1):
        blank = not line.split() or line.split()[0] == "-DOCSTART-"
        if not blank and not inside:
            inside, skipping = True, number in dropped
            sentences += not skipping
        if blank:
            inside, was_skipping, skipping = False, skipping, False
            if was_skipping and not line.split():
                continue
        if not skipping:
            kept.append(line)
    output.write_text("".join(kept), encoding="utf-8")
    return sentences


def write_image_list(images: list, labels: list, columns: tuple[str, str], output: Path) -> int:
    """An image folder's kept images as a csv of absolute paths and labels, which data.train reads as a table."""
    check_clean_suffix(output, ".csv")
    with output.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows((str(Path(image).resolve()), label) for image, label in zip(images, labels))
    return len(images)
