"""ONNX export: a trained model as one `model.onnx` with its preprocessing, fp32 or int8, parity measured."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from finetune import calibration
from finetune.errors import FinetuneError
from finetune.onnx_runtime import EXPORT_FILE, ONNX_FILE, is_export_folder, require_onnx
from finetune.problems import get

OPSET = 18
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FP32_TOLERANCE = 1e-3  # max abs logit difference an fp32 export may show against the torch model
INT8_WARN_POINTS = 2.0  # an int8 test metric this many points below the torch model's prints a warning
PARITY_SAMPLES = 64  # inputs compared between torch and ONNX when no test split is known
CALIBRATION_IMAGES = 64
FUSION_TOLERANCE = 1e-4  # the fused fp32 graph against the exported one, before int8


def vnni_cpu() -> bool:
    """True when the CPU has VNNI int8 dot products: then int8 weights need no reduce_range (no saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


# ---------------------------------------------------------------------------------------------------------------


def export_onnx(source: str | Path, output: str | Path | None = None, quantize: str | None = None) -> dict:
    """Write the export folder for a run or model folder; returns export.json's content."""
    require_onnx()
    from finetune.loading import load_predictor, resolve

    if quantize not in (None, "int8"):
        raise FinetuneError(f"--quantize: '{quantize}' is not supported; use int8 (or leave it out for fp32)")
    if is_export_folder(source):
        raise FinetuneError(f"{source}: is already an ONNX export; export the run or model folder it came from")
    predictor = load_predictor(source, device="cpu")
    predictor.model_dir, _ = resolve(source)
    # the graph computes in fp32: parity is against the torch model in fp32, not under a bf16 run's autocast
    # (a bf16 run's own predictions round logits to ~3 significant digits; its test metric is still compared)
    trained_precision, predictor.precision = predictor.precision, "fp32"
    out = Path(output) if output else _default_output(predictor, source, quantize)
    if out.exists() and any(out.iterdir()):
        if not (out / EXPORT_FILE).is_file():
            raise FinetuneError(f"--output: '{out}' exists and is not an earlier export; choose an empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    image = _is_image(predictor)
    sample = _sample_inputs(predictor)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / ONNX_FILE
        names = _export_image(predictor, fp32) if image else _export_text(predictor, fp32)
        fused = Path(scratch) / "fused.onnx"
        fusion = None if image else _fuse_transformer(predictor, fp32, fused)
        graph = fused if fusion else fp32
        torch_logits = sample_logits(predictor, sample)
        method = None
        if quantize is None:
            shutil.copy(graph, out / ONNX_FILE)
        else:
            method = _quantize(predictor, graph, out / ONNX_FILE, scratch, sample, torch_logits)
    _write_preprocessing(predictor, out, names)
    calibration.copy_into(out, predictor.model_dir)  # predict --confidence-set reads it in the export folder too
    info = {
        "format": "onnx", "quantize": quantize, "opset": OPSET, "bytes": (out / ONNX_FILE).stat().st_size,
        "source": str(source), "inputs": names, "fusion": fusion, "quantization": method,
        "task": predictor.task, "problem": predictor.problem, "labels": predictor.labels,
        "threshold": predictor.threshold, "max_length": None if image else predictor.max_length,
        "parity_reference": "torch fp32", "torch_predict_precision": trained_precision,
        # the run's resolved recipe: predict and eval read tables with the run's columns (pairs, tokens, tags)
        "recipe": _recipe_dict(predictor.recipe),
    }
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    info["parity"] = _parity(predictor, out, sample, torch_logits, quantize)
    info["test"] = _test_metrics(predictor, out)
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(export_card(info))
    _check(info, out)
    return {**info, "path": str(out)}


def _recipe_dict(recipe) -> dict | None:
    from finetune.recipe import to_dict

    return None if recipe is None else to_dict(recipe)


def _is_image(predictor) -> bool:
    from finetune.tasks import get_task

    return get_task(predictor.task).onnx_image_graph()


class SampleLogits(np.ndarray):
    """Logits of the parity sample; for a per-token task [inputs, sub-tokens, tags] with `mask` of the real ones."""

    mask = None


def sample_logits(predictor, sample: list) -> np.ndarray:
    """The model's logits on the parity sample, encoded one way for torch and ONNX alike (`Task.parity_logits`)."""
    from finetune.tasks import get_task

    return get_task(predictor.task).parity_logits(predictor, sample)


def _default_output(predictor, source, quantize) -> Path:
    base = predictor.run_dir if predictor.run_dir is not None else Path(source)
    return base / "export" / ("onnx-int8" if quantize else "onnx")


def _sample_inputs(predictor) -> list:
    """Inputs the parity check runs on: the run's validation/test/train texts or images, else made-up ones."""
    from finetune.evaluation import read_labelled

    recipe = predictor.recipe
    if recipe is not None:
        for spec, split in ((recipe.data.test, "test"), (recipe.data.validation, "validation"),
                            (recipe.data.train, "train")):
            if spec:
                try:
                    raw = read_labelled(recipe, spec, split)
                except FinetuneError:
                    continue
                if getattr(raw, "pairs", None) is not None:  # sentence pairs, encoded as the tokenizer's pair
                    return [{"text": a, "text_pair": b} for a, b in zip(raw.texts[:PARITY_SAMPLES], raw.pairs)]
                return list(raw.texts[:PARITY_SAMPLES])
    if _is_image(predictor):
        size = _image_config(predictor)["input_size"]
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (size[1], size[2], 3), dtype=np.uint8) for _ in range(8)]
    words = ["the", "a", "of", "and", "news", "model", "great", "bad", "today", "very", "good", "story"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(16)]


class _Logits:
    """The model called with named tensors, returning the logits tensor alone (the graph's first output)."""

    def __new__(cls, model, image: bool):
        import torch

        class Text(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask=None, token_type_ids=None):
                given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
                output = self.model(input_ids=input_ids, **{k: v for k, v in given.items() if v is not None})
                return output.logits if hasattr(output, "logits") else output

        class Image(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                output = self.model(pixel_values=pixel_values)
                return output.logits if hasattr(output, "logits") else output

        return (Image if image else Text)().eval()


def _text_input_names(predictor) -> list[str]:
    import inspect

    encoded = predictor.preprocess(["a b", "c"], padding=True)
    model = predictor.model
    target = getattr(model, "backbone", model)
    accepted = set(inspect.signature(target.forward).parameters)
    return [name for name in TEXT_INPUTS if name in encoded and name in accepted]


def _export_text(predictor, path: Path) -> list[str]:
    import torch

    names = _text_input_names(predictor)
    # batch and sequence >= 2 and unequal lengths, or torch.export specialises those axes to the sample's sizes
    batch = predictor.preprocess(["a b c d e f", "a b", "c"], padding=True, return_tensors="pt")
    kwargs = {name: batch[name] for name in names}
    batch_dim, sequence_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: ({0: batch_dim, 1: sequence_dim} if name in names else None) for name in TEXT_INPUTS}
    _run_export(_Logits(predictor.model, image=False), kwargs, shapes, names, path)
    return names


def _export_image(predictor, path: Path) -> list[str]:
    import torch

    size = _image_config(predictor)["input_size"]
    pixels = torch.randn(2, *size)
    batch_dim = torch.export.Dim("batch")
    # timm's efficient nets pool globally, so height and width stay free; the card names the trained size
    shapes = {"pixel_values": {0: batch_dim, 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}}
    try:
        _run_export(_Logits(predictor.model, image=True), {"pixel_values": pixels}, shapes, ["pixel_values"], path)
    except FinetuneError:  # some architectures (ViT's fixed patch grid) need the trained image size
        _run_export(_Logits(predictor.model, image=True), {"pixel_values": pixels},
                    {"pixel_values": {0: batch_dim}}, ["pixel_values"], path)
    return ["pixel_values"]


def _run_export(module, kwargs: dict, shapes: dict, names: list[str], path: Path) -> None:
    import contextlib
    import io

    import torch

    module = module.to("cpu")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (), str(path), kwargs=kwargs, input_names=names, output_names=["logits"],
                dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
            )
    except Exception as error:  # torch.export failures are long; the first line says which construct failed
        first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        raise FinetuneError(f"export: torch.onnx.export failed on this model ({error.__class__.__name__}: {first})")


def _image_config(predictor) -> dict:
    """timm's eval preprocessing of the model: input_size, mean, std, interpolation, crop_pct, crop_mode."""
    from timm.data import resolve_model_data_config

    from finetune.model import timm_model_of

    config = resolve_model_data_config(timm_model_of(predictor.model))
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}


def _write_preprocessing(predictor, out: Path, names: list[str]) -> None:
    """config.json (and tokenizer files) as the contract fixes them: enough for onnxruntime alone."""
    source = Path(predictor.model_dir)
    config = json.loads((source / "config.json").read_text())
    if _is_image(predictor):
        config["label_names"] = predictor.labels
        config.setdefault("pretrained_cfg", {}).update(_image_config(predictor))
    else:
        predictor.preprocess.save_pretrained(out)
        config.update(get(predictor.problem).native_config(predictor.labels))  # tags: id2label is the tag set
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------


def _fuse_transformer(predictor, fp32: Path, out: Path) -> dict | None:
    """onnxscript's onnxruntime fusions on the exported graph: attention (the packed-QKV `Attention` contrib op),
    LayerNorm + residual, bias + GELU. Fewer, larger kernels for fp32, and an attention int8 can quantise too.
    {fused op: count}, or None where nothing fused, the rewriter is missing or failed, or the fused graph is not the
    same function (checked on a padded batch, max abs logit diff FUSION_TOLERANCE)."""
    import collections
    import contextlib
    import io
    import logging

    import onnx

    try:
        import onnx_ir as ir
        import onnxscript.optimizer
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError:  # an onnxscript without its onnxruntime fusions: the graph as exported still works
        return None
    quiet = logging.getLogger("onnxscript")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = ir.load(str(fp32))
            model, _ = optimize_for_ort(model)
            # the packed QKV weight is a Concat of three initialisers: fold it, whatever its size, so that the
            # quantiser sees a constant weight
            onnxscript.optimizer.optimize(model, input_size_limit=1 << 31, output_size_limit=1 << 31)
            graph = ir.to_proto(model)
        _padding_mask_as_mask_index(graph)
        _skip_layer_norm_as_add_and_layer_norm(graph)
        onnx.save(graph, str(out))
    except Exception as error:  # an unfamiliar graph: the unfused one still works
        warnings.warn(f"transformer fusion skipped ({error.__class__.__name__}); the graph is kept as exported")
        return None
    finally:
        quiet.level = level
    fused = ("Attention", "BiasGelu", "FastGelu", "Gelu")
    counts = collections.Counter(node.op_type for node in graph.graph.node if node.op_type in fused)
    if not counts:
        return None
    from finetune.onnx_runtime import make_session

    encoded = predictor.preprocess(["a b c d e f g", "a b", "c d e"], padding=True, return_tensors="pt")
    batch = {key: value.numpy() for key, value in encoded.items()}
    results = []
    for path in (fp32, out):
        session = make_session(path)
        results.append(session.run(None, {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})[0])
    if float(np.max(np.abs(results[0] - results[1]))) > FUSION_TOLERANCE:
        return None
    return dict(counts)


def _padding_mask_as_mask_index(graph) -> None:
    """Give each fused `Attention` the padding mask as `mask_index` (the 0/1 attention_mask as int32) in place of
    the additive attention bias the exported graph computes from it. The same function (the fusion parity check
    holds it to that), but onnxruntime's int8 `QAttention` takes a mask_index and has no attention-bias input: the
    quantiser would drop the bias, and padded tokens would be attended to. Also drops `qkv_hidden_sizes` when Q, K
    and V are one size, which QAttention does not take."""
    from onnx import TensorProto, helper

    if "attention_mask" not in {item.name for item in graph.graph.input}:
        return
    attentions = [node for node in graph.graph.node if node.op_type == "Attention"]
    cast = "attention_mask_int32"
    for node in attentions:
        inputs = [*node.input, *[""] * (6 - len(node.input))]
        if inputs[3] or not inputs[5] or any(inputs[6:]):  # a mask_index already, no bias, or past state: leave it
            continue
        inputs[3], inputs[5] = cast, ""
        while inputs[-1] == "":
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        for attribute in list(node.attribute):
            if attribute.name == "qkv_hidden_sizes" and len(set(attribute.ints)) == 1:
                node.attribute.remove(attribute)
    if any(cast in node.input for node in attentions):
        graph.graph.node.insert(0, helper.make_node("Cast", ["attention_mask"], [cast], to=TensorProto.INT32,
                                                    name="attention_mask_to_int32"))
    _drop_unused_nodes(graph)


def _skip_layer_norm_as_add_and_layer_norm(graph) -> None:
    """Undo the residual + LayerNorm fusion: each `SkipLayerNormalization` becomes `Add` (the residual, and the bias
    when it has one) and the standard `LayerNormalization`. onnxruntime 1.32's CPU kernel for the fused op takes 2 ms
    on a 32 x 64 x 384 batch where Add + LayerNormalization take 0.6 ms (it accumulates in double), a third of the
    int8 model's time. Nodes whose mean or inverse-std outputs something reads are left fused."""
    from onnx import helper

    if any(attribute.type in (attribute.GRAPH, attribute.GRAPHS) for node in graph.graph.node
           for attribute in node.attribute):
        return  # a subgraph may read the mean or inverse std by name
    read = {name for node in graph.graph.node for name in node.input} | {item.name for item in graph.graph.output}
    nodes = []
    for node in graph.graph.node:
        outputs = [name if name in read else "" for name in [*node.output, *[""] * (4 - len(node.output))]]
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or outputs[1] or outputs[2]:
            nodes.append(node)
            continue
        inputs = [*node.input, *[""] * (5 - len(node.input))]
        epsilon = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-12)
        summed = outputs[3] if outputs[3] and not inputs[4] else f"{node.name}_residual"
        nodes.append(helper.make_node("Add", inputs[:2], [summed], name=f"{node.name}_add"))
        if inputs[4]:  # the bias of the projection before it
            biased = outputs[3] or f"{node.name}_residual_bias"
            nodes.append(helper.make_node("Add", [summed, inputs[4]], [biased], name=f"{node.name}_add_bias"))
            summed = biased
        nodes.append(helper.make_node("LayerNormalization", [summed, inputs[2], *inputs[3:4]], [outputs[0]],
                                      name=f"{node.name}_layer_norm", axis=-1, epsilon=epsilon))
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)


def _drop_unused_nodes(graph) -> None:
    """Nodes whose outputs nothing reads (the attention bias's computation, once no Attention takes it)."""
    if any(attribute.type in (attribute.GRAPH, attribute.GRAPHS) for node in graph.graph.node
           for attribute in node.attribute):
        return  # a subgraph may read outer names: leave the unused nodes to the session's own pruning
    needed = {item.name for item in graph.graph.output}
    kept = []
    for node in reversed(graph.graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.graph.node[:]
    graph.graph.node.extend(reversed(kept))


def _quantize(predictor, fp32: Path, int8: Path, scratch: str, sample: list, torch_logits) -> dict:
    """int8 weights: dynamic for transformers (per output channel, on the fused graph); static QDQ for conv nets
    unless it agrees less than dynamic."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not vnni_cpu()
    dynamic = Path(scratch) / "dynamic.onnx"
    if not _is_image(predictor):
        # the fused graph's contrib ops carry no inferred types: the quantiser then takes their outputs as float
        quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        shutil.copy(dynamic, int8)
        return {"method": "dynamic", "weights": "int8", "per_channel": True, "reduce_range": reduce_range,
                "quantized_ops": _quantized_ops(int8)}
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=False,
                     reduce_range=reduce_range)
    chosen = {"method": "dynamic", "weights": "int8", "reduce_range": reduce_range}
    static = Path(scratch) / "static.onnx"
    try:
        _quantize_static(predictor, fp32, static, reduce_range)
    except Exception as error:  # an op the static quantiser cannot handle: dynamic still works
        warnings.warn(f"static int8 failed ({error.__class__.__name__}); using dynamic int8")
        shutil.copy(dynamic, int8)
        return chosen
    agree = {}
    for name, path in (("dynamic", dynamic), ("static-qdq", static)):
        logits = _onnx_predictor(predictor, path).logits(sample)
        agree[name] = float(np.mean(logits.argmax(-1) == torch_logits.argmax(-1)))
    chosen["agreement_on_sample"] = agree
    if agree["static-qdq"] >= agree["dynamic"]:
        shutil.copy(static, int8)
        chosen.update(method="static-qdq", calibration_images=CALIBRATION_IMAGES, activations="uint8")
    else:
        shutil.copy(dynamic, int8)
    return chosen


def _quantized_ops(path: Path) -> dict:
    """{int8 op: count} in the quantised graph (QAttention present: the attention runs in int8 too)."""
    import collections

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node if n.op_type in ("MatMulInteger", "QAttention")))


def _quantize_static(predictor, fp32: Path, out: Path, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images = _calibration_images(predictor)
    transform = predictor.preprocess
    from finetune.tasks.image_classification.files import load_image

    batches = [{"pixel_values": transform(load_image(entry)).unsqueeze(0).numpy()} for entry in images]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=reduce_range)


def _calibration_images(predictor) -> list:
    """A fixed sample of the run's training images (made-up pixels when the run is not known)."""
    from finetune.evaluation import read_labelled

    recipe = predictor.recipe
    if recipe is not None and recipe.data.train:
        raw = read_labelled(recipe, recipe.data.train, "train")
        entries = list(raw.texts)
        step = max(1, len(entries) // CALIBRATION_IMAGES)
        return entries[::step][:CALIBRATION_IMAGES]
    return _sample_inputs(predictor)


# ---------------------------------------------------------------------------------------------------------------


def _onnx_predictor(predictor, path: Path):
    from finetune.onnx_runtime import OnnxPredictor

    return OnnxPredictor.from_parts(path, predictor)


def _parity(predictor, out: Path, sample: list, torch_logits, quantize) -> dict:
    logits = np.asarray(sample_logits(_onnx_predictor(predictor, out / ONNX_FILE), sample))
    mask = getattr(torch_logits, "mask", None)
    torch_logits = np.asarray(torch_logits)
    if mask is not None:  # per token: the real sub-tokens of each input (padding is not compared)
        logits, torch_logits = logits[mask], torch_logits[mask]
    parity = {"max_abs_logit_diff": float(np.max(np.abs(logits - torch_logits))), "samples": len(sample)}
    if mask is not None:
        parity["agreement"] = float(np.mean(logits.argmax(-1) == torch_logits.argmax(-1)))
        parity["agreement_of"] = "sub-tokens"
    else:
        parity["agreement"] = get(predictor.problem).agreement(logits, torch_logits, predictor.threshold)
    return parity


def _test_metrics(predictor, out: Path) -> dict | None:
    """{"torch": metrics, "onnx": metrics} on the run's test split: data.test, or the test split of the data set
    data.train names (the zoo's, a hub set's, a split folder's) when the run tested on it; None when it had none."""
    from finetune.evaluation import evaluate_model

    recipe = predictor.recipe
    if recipe is None:
        return None
    data = recipe.data.test
    if not data and _run_had_test_split(predictor.run_dir):
        data = recipe.data.train
    if not data:
        return None
    torch_metrics = evaluate_model(str(predictor.run_dir), data, split="test", progress=False)["metrics"]
    d = recipe.data
    columns = {"text_column": d.text_column, "label_column": d.label_column, "image_column": d.image_column,
               "pair_column": d.text_pair_column}
    onnx_metrics = evaluate_model(str(out), data, split="test", progress=False, **columns)["metrics"]
    return {"torch": torch_metrics, "onnx": onnx_metrics, "data": data}


def _run_had_test_split(run_dir: Path | None) -> bool:
    """Whether the run's split.json records a test split (data.test null: the data set's own)."""
    try:
        return "test" in json.loads((Path(run_dir) / "split.json").read_text()).get("splits", {})
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _check(info: dict, out: Path) -> None:
    diff = info["parity"]["max_abs_logit_diff"]
    if info["quantize"] is None and diff > FP32_TOLERANCE:
        raise FinetuneError(
            f"{out}: the ONNX logits differ from the torch model's by {diff:.2e} (> {FP32_TOLERANCE}); the export "
            "is kept for inspection but should not be used; report the architecture"
        )
    test = info.get("test")
    if info["quantize"] and test:
        for name, value in test["torch"].items():
            if name == "loss" or name not in test["onnx"]:
                continue
            drop = (value - test["onnx"][name]) * 100
            if drop > INT8_WARN_POINTS and not name.endswith(("mse", "mae", "rmse")):
                print(f"finetune: warning: int8 {name} is {drop:.1f} points below the torch model's "
                      f"({test['onnx'][name]:.4f} vs {value:.4f}); use the fp32 export if that matters")


def export_card(info: dict) -> str:
    """The export's README: what it is, how it matches the torch model, and the ten lines that run it."""
    from finetune.tasks import get_task

    parity = info["parity"]
    lines = [
        f"# ONNX export ({info['quantize'] or 'fp32'})", "",
        (f"Exported by finetune from `{info['source']}`: task {info['task']}, problem {info['problem']}, "
         f"{len(info['labels'] or [])} labels, opset {info['opset']}, {info['bytes'] / 1e6:.1f} MB."), "",
        "## Parity with the torch model", "",
        f"- max abs logit difference: {parity['max_abs_logit_diff']:.3g} on {parity['samples']} inputs",
    ]
    if parity.get("agreement") is not None:
        lines.append(f"- predicted labels agree on {parity['agreement']:.1%} of them")
    if info.get("quantization"):
        lines.append(f"- int8 method: {info['quantization']['method']}")
    if info.get("test"):
        for name, value in info["test"]["torch"].items():
            lines.append(f"- test {name}: torch {value:.4f}, onnx {info['test']['onnx'].get(name, float('nan')):.4f}")
    usage = get_task(info["task"]).onnx_usage(info)  # each task knows what its inputs are and what comes out
    lines += ["", "## Run it with onnxruntime alone", "", "```python", *usage.strip("\n").splitlines(), "```", ""]
    return "\n".join(lines)
