"""Token classification's side of `finetune explain`: one target per predicted entity (its tag on its first
sub-token), each explained over the sentence's words."""

from __future__ import annotations

import numpy as np

from finetune.errors import FinetuneError
from finetune.tasks.explaining import Subject, Target, TextExplainable, word_list
from finetune.tasks.token_classification.tags import PREFIXED


class TokenExplainable(TextExplainable):
    def subjects(self, entries: list, label: str | None) -> list[Subject]:
        names = self.predictor.labels
        kinds = {PREFIXED.match(n).group(2) if PREFIXED.match(n) else n for n in names}
        if label is not None and label not in kinds | set(names):
            raise FinetuneError(f"--label {label}: not one of the model's entity types ({', '.join(sorted(kinds))})")
        predicted = self.predictor.predict(list(entries))
        subjects = []
        for entry, result in zip(entries, predicted):
            subject = self.encode(entry if isinstance(entry, str) else " ".join(entry))
            scores = self.transform(self.logits_of(subject).float())[0]
            starts = {unit["start"]: i for i, unit in enumerate(subject.units)}
            for entity in result["entities"]:
                word = starts.get(entity["start"])
                if word is None or (label is not None and label not in (entity["label"],)):
                    continue
                position = int((subject.unit_index == word).nonzero()[0])
                index = int(scores[position].argmax())
                about = {key: entity[key] for key in ("word", "start", "end")}
                subject.targets.append(Target(entity["label"], float(scores[position, index]), index, position,
                                              about))
            subjects.append(subject)
        return subjects

    def describe(self, subject: Subject, explained: list[tuple[Target, np.ndarray]]) -> dict:
        return {"entities": [{**target.about, "label": target.label, "score": target.score,
                              "words": word_list(subject, values, 0)} for target, values in explained]}

    def erase(self, subject: Subject, keep: np.ndarray):
        raise FinetuneError("--faithfulness: scores a label per input; token classification labels each word")
