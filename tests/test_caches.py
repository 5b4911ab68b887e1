"""`finetune cache ls|clear`: the token and feature caches the kit writes, their sizes, and clearing them."""

from __future__ import annotations

import json

from conftest import run_cli


def test_the_token_cache_is_where_tokenize_writes(tiny_bert):
    from transformers import AutoTokenizer

    from finetune.caches import token_cache_dir, usage
    from finetune.tasks.text_classification.tokens import tokenize_texts as tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenize({"text": ["the bread today", "a goal of news"], "label": [0, 1]}, tokenizer, 16)
    assert any(token_cache_dir().glob("*.arrow")) and usage("tokens")["files"] >= 1


def test_cache_ls_and_clear(tmp_path):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets"), "FINETUNE_CACHE": str(tmp_path / "finetune")}
    tokens, features = tmp_path / "datasets" / "finetune-tokens", tmp_path / "finetune" / "features"
    tokens.mkdir(parents=True)
    features.mkdir(parents=True)
    (tokens / "a.arrow").write_bytes(b"x" * 3000)
    (features / "b.safetensors").write_bytes(b"y" * 5000)
    (features / "c.safetensors").write_bytes(b"z" * 100)
    listed = run_cli("cache", "ls", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["cache"]: row for row in json.loads(listed.stdout)}
    assert rows["tokens"] == {"cache": "tokens", "path": str(tokens), "files": 1, "bytes": 3000}
    assert rows["features"]["files"] == 2 and rows["features"]["bytes"] == 5100
    table = run_cli("cache", "ls", **env).stdout
    assert "2.9 KB" in table and str(features) in table

    cleared = run_cli("cache", "clear", "features", **env)
    assert cleared.returncode == 0 and "removed 2 files (5.0 KB)" in cleared.stdout, cleared.stderr
    assert not features.exists() and (tokens / "a.arrow").is_file()  # only the cache named
    assert run_cli("cache", "clear", **env).returncode == 0
    assert not tokens.exists()
    rows = json.loads(run_cli("cache", "ls", "--json", **env).stdout)
    assert [row["files"] for row in rows] == [0, 0]
