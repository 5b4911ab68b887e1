"""eval.metrics naming Hugging Face `evaluate` modules ('evaluate:<folder or hub id>[#key]'): loaded through
evaluate.load only when the recipe trusts their code, scored beside the built-ins at every evaluation (training,
`finetune eval`, token tags), and refused with one line when they cannot load or answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import call_main, one_error_line, to_recipe, write_recipe

from finetune.errors import FinetuneError

pytest.importorskip("evaluate")

MODULE = '''
import datasets
import evaluate

{marker}


class {cls}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="a test module", citation="", inputs_description="",
                                   features=datasets.Features({features}))

    def _compute(self, predictions, references{extra}):
{body}
'''

INTS = '{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}'
TAG_ROWS = ('{"predictions": datasets.Sequence(datasets.Value("string")), '
            '"references": datasets.Sequence(datasets.Value("string"))}')


def write_module(root: Path, name: str, body: str, features: str = INTS, extra: str = "", marker: str = "") -> str:
    """A local evaluate module (a folder holding <name>.py, as evaluate.load wants it); returns its eval entry."""
    folder = root / name
    folder.mkdir(parents=True)
    cls = "".join(part.title() for part in name.split("_"))
    (folder / f"{name}.py").write_text(MODULE.format(cls=cls, features=features, extra=extra, marker=marker,
                                                     body="\n".join(" " * 8 + line for line in body.splitlines())))
    return f"evaluate:{folder}"


ACCURACY = "return {'hits': sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}"


def test_a_trusted_module_scores_every_evaluation_like_the_built_in(make_recipe, tmp_path, capfd):
    from finetune.train import train

    entry = write_module(tmp_path / "metrics", "hits", ACCURACY)
    raw = make_recipe(**{"eval.metrics": ["accuracy", entry], "eval.select_best": entry,
                         "eval.trust_metric_code": True, "train.epochs": 3, "train.lr": 3e-3})
    train(to_recipe(raw))
    run = Path(raw["output"]["dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    values = [epoch["validation"][entry] for epoch in metrics["epochs"]]
    assert values == [epoch["validation"]["accuracy"] for epoch in metrics["epochs"]]
    assert metrics["test"][entry] == metrics["test"]["accuracy"] > 1 / 3  # three topics: chance is 1/3
    assert max(values) > min(values) or values[0] > 1 / 3  # a number that moves with the model, not a constant

    done = call_main(capfd, "eval", run, "--data", raw["data"]["test"], "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["metrics"][entry] == pytest.approx(metrics["test"]["accuracy"])


def test_an_untrusted_module_is_refused_before_its_code_runs(make_recipe, tmp_path, capfd):
    marker = tmp_path / "ran"
    entry = write_module(tmp_path / "metrics", "spy", ACCURACY, marker=f"open({str(marker)!r}, 'w').close()")
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(**{"eval.metrics": [entry]}))
    line = one_error_line(call_main(capfd, "validate", recipe))
    assert "eval.metrics" in line and entry in line and "eval.trust_metric_code=true" in line
    assert not marker.exists()


def test_a_hub_id_that_cannot_be_reached_is_one_line_naming_it(make_recipe, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so 'no_such_metric_here' is no local folder either
    raw = make_recipe(**{"eval.metrics": ["evaluate:no_such_metric_here"], "eval.trust_metric_code": True})
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "r.yaml", raw)))
    assert "evaluate:no_such_metric_here" in line and "local folder" in line


def test_several_numbers_need_a_key_and_the_key_and_arguments_reach_compute(make_recipe, tmp_path):
    import numpy as np

    from finetune.metrics import compute_metrics

    body = ("hits = sum(int(p == r) for p, r in zip(predictions, references))\n"
            "return {'counts': {'hits': hits + offset, 'misses': len(references) - hits}, 'note': 'text'}")
    entry = write_module(tmp_path / "metrics", "counts", body, extra=", offset=0")
    truth, predicted = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])

    keyed = f"{entry}#counts/hits"
    to_recipe(make_recipe(**{"eval.metrics": [keyed], "eval.trust_metric_code": True,
                             "eval.metric_args": {keyed: {"offset": 10}}}))
    assert compute_metrics([keyed], truth, predicted) == {keyed: 13.0}

    to_recipe(make_recipe(**{"eval.metrics": [entry], "eval.trust_metric_code": True}))
    with pytest.raises(FinetuneError, match=r"returned counts/hits, counts/misses; name one as '.*#<key>'"):
        compute_metrics([entry], truth, predicted)
    missing = f"{entry}#counts/nope"
    to_recipe(make_recipe(**{"eval.metrics": [missing], "eval.trust_metric_code": True}))
    with pytest.raises(FinetuneError, match="returned no 'counts/nope'; it returned counts/hits, counts/misses"):
        compute_metrics([missing], truth, predicted)


def test_lower_is_better_turns_the_selection_around(make_recipe, tmp_path):
    from finetune.metrics import higher_is_better, is_improvement

    errors = write_module(tmp_path / "metrics", "errors", "return {'errors': sum(int(p != r) for p, r in "
                                                           "zip(predictions, references))}")
    hits = write_module(tmp_path / "metrics", "hits", ACCURACY)
    to_recipe(make_recipe(**{"eval.metrics": [errors, hits], "eval.select_best": errors,
                             "eval.lower_is_better": [errors], "eval.trust_metric_code": True}))
    assert not higher_is_better(errors) and higher_is_better(hits)
    assert is_improvement(errors, 2.0, 3.0) and not is_improvement(errors, 3.0, 2.0)
    assert is_improvement(hits, 0.9, 0.8)


@pytest.mark.parametrize("dotted, expected", [
    ({"eval.metric_args": {"evaluate:x": {"a": 1}}}, "eval.metric_args: 'evaluate:x' is not an evaluate entry of"),
    ({"eval.lower_is_better": ["accuracy"]}, "eval.lower_is_better: 'accuracy' is for evaluate entries only"),
    ({"eval.metrics": ["evaluate:"], "eval.trust_metric_code": True}, "eval.metrics: 'evaluate:' should be"),
])
def test_bad_evaluate_keys_name_the_key(make_recipe, dotted, expected):
    with pytest.raises(FinetuneError, match=expected.replace("(", r"\(")):
        to_recipe(make_recipe(**dotted))


def test_a_module_over_tag_rows_scores_a_token_run_like_token_accuracy(tmp_path):
    import torch
    from test_token_classification import PIECES, SPECIAL, corpus, write
    from test_token_task import token_raw
    from transformers import BertConfig, BertModel, BertTokenizer

    from finetune.train import train

    backbone = tmp_path / "bert"
    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + PIECES)}).save_pretrained(backbone)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIAL + PIECES), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(backbone)
    data = {key: write(tmp_path / f"{key}.conll", corpus(seed, count))
            for seed, (key, count) in enumerate((("train", 32), ("validation", 16), ("test", 16)))}
    body = ("pairs = [(a, b) for t, p in zip(references, predictions) for a, b in zip(t, p)]\n"
            "return {'words': sum(int(a == b) for a, b in pairs) / len(pairs)}")
    entry = write_module(tmp_path / "metrics", "words", body, features=TAG_ROWS)
    raw = token_raw(backbone, data, tmp_path / "run")
    raw["train"]["epochs"] = 2
    raw["eval"] = {"metrics": ["token_accuracy", entry], "trust_metric_code": True}
    train(to_recipe(raw))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for scores in [epoch["validation"] for epoch in metrics["epochs"]] + [metrics["test"]]:
        assert scores[entry] == pytest.approx(scores["token_accuracy"])
