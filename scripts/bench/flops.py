"""The machine's limit and the model's work: fp32 matmul peak, FLOPs per token or image, which count applies."""

from __future__ import annotations

import math
import time


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 8) -> float:
    """Best-of-N fp32 matmul speed at this thread count: the ceiling a dense model's training can approach."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best / 1e9


def text_flops(recipe, texts: list[str]) -> dict:
    """Model FLOPs per real token (see the module docstring), with the counts they come from."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from finetune.backbones import resolve_text_source

    source = resolve_text_source(recipe.backbone.name)
    config = AutoConfig.from_pretrained(source)
    model = AutoModel.from_config(config)
    pooler = {name for name, _ in model.named_modules() if name.split(".")[0] == "pooler"}
    matmul_params = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not any(name.startswith(p) for p in pooler))
    layers, hidden = config.num_hidden_layers, config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(source)
    lengths = [len(ids)
               for ids in tokenizer(list(texts), truncation=True, max_length=recipe.data.max_length)["input_ids"]]
    tokens = sum(lengths)
    effective = sum(n * n for n in lengths) / tokens  # attention grows with each row's own length
    per_token = {
        "full": 6 * matmul_params + 12 * layers * hidden * effective,
        "lora": 4 * matmul_params + 12 * layers * hidden * effective,
        "frozen": 2 * matmul_params + 4 * layers * hidden * effective,
    }
    # a cross-check of the formula against torch's own counter, fine-tuning one row of the mean length
    from torch.utils.flop_counter import FlopCounterMode

    length = max(2, round(tokens / len(lengths)))
    ids = torch.randint(0, config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().backward()
    formula = 6 * matmul_params * length + 12 * layers * hidden * length * length
    return {"per_token": per_token, "matmul_params": matmul_params, "layers": layers, "hidden": hidden,
            "tokens_per_epoch": tokens, "rows": len(lengths), "effective_length": effective,
            "check": {"length": length, "formula": formula, "flop_counter": counter.get_total_flops()}}


def image_flops(recipe, label_names) -> dict:
    """Training FLOPs per image: 3 x one image's forward, counted by torch's FlopCounterMode.

    Not the counter on the backward too: it prices a depthwise convolution's backward as a dense one (groups
    ignored), 40x too much on EfficientNet."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.tasks.image_classification.model import build_vision_model

    model, data_config = build_vision_model(recipe, label_names)
    size = data_config["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(pixel_values=torch.randn(1, *size))
    forward = counter.get_total_flops()
    return {"per_image": {"full": 3 * forward, "frozen": forward}, "input_size": list(size)}


def flops_mode(result: dict, recipe, kind: str) -> str | None:
    if kind == "kit" and result.get("cached_features"):
        return None  # the loop trains a linear head on stored features: no backbone FLOPs in it
    if recipe.train.freeze == "backbone" or result.get("frozen_backbone"):
        return "frozen"
    if kind == "kit" and recipe.lora is not None:
        return "lora"
    return "full"
