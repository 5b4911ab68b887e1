"""`finetune explain`: attributions per word or pixel through captum on each task's `Explainable` (`api`: what the CLI
and `serve` call; `methods`: captum's methods, batched; `faithfulness`: ERASER's measures; `render`: terminal and
HTML)."""
