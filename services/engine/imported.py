"""The import job of the user's own model, in the job's child process: check it for real, load it,
export it, and measure its card.

ONNX: every external-data path must stay beside the model (checked before any of it is read) ->
onnx.checker with full_check -> ONNX Runtime loads it -> input shapes resolved (a dynamic
dimension must have been fixed at import) -> one self-contained file in the artifact store.

Hugging Face (a folder uploaded as a zip, or fetched from the Hub into EXPLORER_HOME/hf-cache):
see hf_import.py (safetensors only, AutoModel with trust_remote_code=False, mean-pooled, to ONNX).

Then the card, measured as pipeline.measure_model does: size and zipped size, parameters (by
operator too), input and output shapes, baseline score and latency, and which methods apply.

Nothing here runs code from the upload. Problems the user can fix are UserErrors (one sentence).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from services import data_fit, imports
from services.engine import measure
from services.engine.families.base import ModelAdapter, Progress
from services.engine.tasks import uploaded
from services.errors import UserError
from storage.artifacts import ArtifactStore

EVAL_SECONDS = 1.0  # about how long scoring the original model on made-up inputs may take


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(error).__name__)
    return line[:300].rstrip(".")


def prepare(store: ArtifactStore, model: dict, progress: Progress) -> dict:
    """The 'prepare' job of a model whose source is 'upload'; returns the model row's update."""
    from services.engine import tasks

    started = time.perf_counter()
    meta = uploaded.meta_of(model)
    scratch = store.scratch_dir("models", model["id"], "tmp")
    try:
        if meta["kind"] == "hf":
            onnx_path = _import_hf(store, model, meta, scratch, progress)
            output_kind = "logits" if meta.get("head") else "embedding"
        else:
            onnx_path, output_kind = _import_onnx(store, model, meta, scratch, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta["output_kind"] = output_kind
    task, note = _settle_task(model["task"], meta, output_kind)
    if task == "your-data":
        note = _order_labels(meta, store.home) or note
    row = {**model, "task": task, "meta": meta}
    # The same measurements as pipeline.measure_model, arranged so that the zipped size (zlib, which
    # releases the GIL: seconds for a 90 MB model) is computed on the other core while the model is
    # scored, and the latency is timed after it, alone.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sizes = pool.submit(measure.file_sizes, onnx_path)
        progress(0.7, "preparing the inputs it is scored on")
        evaluation = _sized_eval_set(task, row, onnx_path, store.home)
        progress(0.75, f"scoring the baseline on {evaluation.extra.get('data', task)}")
        outputs = measure.run_outputs(measure.session(onnx_path), evaluation)
        if task == "your-data":
            _check_class_count(meta, evaluation, outputs)
        card = {**measure.parameter_counts(onnx_path),
                **tasks.score(task, model["id"], output_kind, evaluation, outputs, outputs)}
        card.update(io=measure.io_shapes(onnx_path), params_by_op=measure.params_by_op(onnx_path))
        card.update(sizes.result())
    progress(0.85, "timing it with ONNX Runtime")
    card.update(measure.measure_latency([onnx_path], evaluation, seconds=measure.CARD_SECONDS)[0])
    card.update(output_kind=output_kind, methods=imports.method_applicability(model),
                eval_data=evaluation.extra.get("data", ""), import_seconds=round(time.perf_counter() - started, 2))
    if note:
        card["note"] = note
    if meta.get("label_names") and task == "your-data":
        card["label_order"] = {"by": meta["label_order"], "labels": meta["label_names"]}
    return {"model_update": {"status": "ready", "card": card, "artifact": store.relative(onnx_path), "error": None,
                             "task": task, "meta": json.dumps(meta)}}


def _sized_eval_set(task: str, row: dict, onnx_path: Path, home: Path):
    """Check that the model runs on its inputs, then size the made-up inputs to the model's speed:
    up to 256 samples scored in about EVAL_SECONDS, a smaller timing batch for slow models. The sizes
    are kept in the meta, so every later run of this model uses the same inputs."""
    meta = row["meta"]
    evaluation = uploaded.eval_set(task, row, home)
    feed = evaluation.head(8)
    session = measure.session(onnx_path)
    try:
        session.run(None, evaluation.head(2))  # the first call also sets ONNX Runtime up
        begun = time.perf_counter()
        session.run(None, feed)
        per_sample = (time.perf_counter() - begun) / 8
    except Exception as error:  # ONNX Runtime refuses these inputs: say which shapes were tried
        shapes = ", ".join(f"{k} {tuple(v.shape[1:])} {v.dtype}" for k, v in feed.items())
        raise UserError(f"The model does not run on samples shaped {shapes}: {_first_line(error)}.") from None
    samples = int(EVAL_SECONDS / max(per_sample, 1e-9)) // 16 * 16
    meta["eval_samples"] = max(32, min(uploaded.SYNTHETIC_SAMPLES, samples))
    meta["latency_batch"] = uploaded.LATENCY_BATCH if per_sample * uploaded.LATENCY_BATCH <= 0.05 else 8
    return uploaded.eval_set(task, row, home)


def adapter_for(store: ArtifactStore, model: dict) -> ModelAdapter:
    """What compress needs to know about an uploaded model (a torch module only for HF uploads)."""
    meta = uploaded.meta_of(model)
    if meta.get("kind") == "hf":
        from services.engine.hf_import import HFUploadAdapter

        return HFUploadAdapter(_folder(store, meta), meta["input_names"], int(meta["vocab_size"]), meta.get("head"))
    adapter = ModelAdapter()
    adapter.model_id = model["id"]
    adapter.output_kind = meta.get("output_kind", "logits")
    return adapter


def _folder(store: ArtifactStore, meta: dict) -> Path:
    folder = (store.home / meta["folder"]).resolve()
    if store.home not in folder.parents:
        raise UserError("The model's files lie outside the data folder.")
    return folder


def _settle_task(task: str, meta: dict, output_kind: str) -> tuple[str, str]:
    """Labels score only class logits; otherwise the model is scored on fidelity, and the card says why."""
    if task != "your-data" or output_kind == "logits":
        return task, ""
    if meta.get("kind") == "hf":
        named = ", ".join(meta.get("architectures") or []) or "no architecture"
        return "fidelity", (f"Scored on fidelity over the data set's texts: the model has no sequence-classification "
                            f"head (its config names {named}), so it gives a sentence embedding rather than one score "
                            f"per label, and the data set's labels could not be used.")
    return "fidelity", ("Scored on fidelity: the model's output does not look like class scores, so the data "
                        "set's labels could not be used.")


def _order_labels(meta: dict, home: Path) -> str:
    """Which output each label of a CSV or WAV data set is: the config's id2label when its names are the
    data set's labels, else the labels sorted (data_fit.label_order). Kept in the meta, so every later run
    reads the labels the same way; returns the sentence the card shows."""
    dataset = meta.get("dataset") or {}
    if dataset.get("kind") not in ("csv", "wav"):
        return ""
    names, how = data_fit.label_order(uploaded.data_label_names(home, dataset), meta.get("id2label"))
    meta["label_names"], meta["label_order"] = names, how
    return data_fit.describe_label_order(names, how)


def _check_class_count(meta: dict, evaluation, outputs) -> None:
    """Class scores and labels must agree in number (or, for integer class ids, the ids must be outputs)."""
    dataset = meta.get("dataset") or {}
    classes = int(outputs.reshape(len(outputs), -1).shape[1])
    if meta.get("label_names"):
        problem = data_fit.class_count_problem(classes, dataset, n_labels=len(meta["label_names"]))
    elif dataset.get("label_type") == "string" and dataset.get("classes"):
        problem = data_fit.class_count_problem(classes, dataset, n_labels=len(dataset["classes"]))
    else:
        problem = data_fit.class_count_problem(classes, dataset, top_id=int(evaluation.labels.max()))
    if problem:
        raise UserError(problem)


# ---- ONNX --------------------------------------------------------------------------------------

def _all_tensors(proto):
    """Every TensorProto of a model: initializers, node attributes, subgraphs and functions."""
    def from_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from from_node(node)

    def from_node(node):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from from_graph(attribute.g)
            for graph in attribute.graphs:
                yield from from_graph(graph)

    yield from from_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from from_node(node)


def load_with_checked_external_data(path: Path, label: str):
    """The model proto without its external data, after checking that every external-data file is a
    regular file beside the model, inside its folder, and long enough. Nothing outside is read."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise UserError(f"{label} is not a valid ONNX model: it is truncated, damaged or not ONNX at all.") from None
    base = path.parent.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = location.replace("\\", "/")
        escapes = (not where or where.startswith("/") or re.match(r"^[A-Za-z]:", where) is not None
                   or ".." in PurePosixPath(where).parts)
        target = base / where
        if not escapes:
            escapes = base not in target.resolve().parents
        if escapes:
            raise UserError(f"The ONNX model's weights point outside its folder ({location!r} for {tensor.name}); "
                            f"external data must sit beside the model, so it was refused.")
        if target.is_symlink() or not target.is_file():
            raise UserError(f"The ONNX model's weights file {location} is missing from the upload.")
        size = target.stat().st_size
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            offset, length = -1, 0
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"The ONNX model's weights file {location} is shorter than the model says (tensor "
                            f"{tensor.name}); the upload is incomplete.")
    return proto


def _ort_type(text: str) -> str:
    match = re.fullmatch(r"tensor\((\w+)\)", text)
    return match.group(1) if match else text


def _import_onnx(store: ArtifactStore, model: dict, meta: dict, scratch: Path, progress: Progress):
    import onnx

    folder = _folder(store, meta)
    path = folder / meta["onnx_file"]
    label = meta.get("source") or path.name
    progress(0.05, "checking the ONNX file and where its weights live")
    proto = load_with_checked_external_data(path, label)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto))
    progress(0.15, "running the ONNX checker (full check)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise UserError(f"The ONNX checker refused {label}: {_first_line(error)}.") from None
    progress(0.3, "loading it in ONNX Runtime")
    try:
        session = measure.session(path)
    except Exception as error:
        raise UserError(f"ONNX Runtime cannot load {label}: {_first_line(error)}.") from None
    inputs = []
    for arg in session.get_inputs():
        if not arg.type.startswith("tensor("):
            raise UserError(f"The model's input {arg.name!r} is a {arg.type}; only tensor inputs are supported.")
        inputs.append(imports.OnnxInput(arg.name, _ort_type(arg.type), list(arg.shape)))
    resolved = imports.resolve_shapes(inputs, meta.get("input_shapes") or {})
    _fill_hints(proto, resolved)
    meta["inputs"] = resolved
    target = path
    if any(spec["batch"] != "dynamic" for spec in resolved.values()):
        target = _relax_batch(path, meta, scratch, label)
    elif has_external:  # one self-contained file: what measuring, compressing and downloading expect
        target = scratch / "model.onnx"
        onnx.save(onnx.load(str(path)), str(target))
    progress(0.6, "storing the model")
    final = store.put_file(target, "models", model["id"], "model.onnx")
    return final, _output_kind(proto, session)


def _fill_hints(proto, resolved: dict) -> None:
    """How to make up integer inputs: token ids below the table they index, masks of ones."""
    sizes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for name, spec in resolved.items():
        if spec["dtype"] not in uploaded.NUMPY_TYPES or not spec["dtype"].startswith(("int", "uint")):
            continue
        lowered = name.lower()
        if "mask" in lowered:
            spec["fill"] = "ones"
        elif "type" in lowered or "segment" in lowered or "position" in lowered:
            spec["fill"] = "zeros"
        else:
            tables = [sizes[n.input[0]][0] for n in proto.graph.node
                      if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and sizes.get(n.input[0])]
            spec["fill"], spec["high"] = "integers", min(tables) if tables else 2


def _relax_batch(path: Path, meta: dict, scratch: Path, label: str) -> Path:
    """A graph whose batch size is fixed (often to 1) cannot be timed at batch 32 or scored in
    batches: make its first dimension symbolic, and keep that only if the graph then runs."""
    import onnx

    resolved = meta["inputs"]
    fixed = next(spec["batch"] for spec in resolved.values() if spec["batch"] != "dynamic")
    proto = onnx.load(str(path))
    values = [v for v in proto.graph.input if v.name in resolved] + list(proto.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del proto.graph.value_info[:]
    target = scratch / "model.onnx"
    onnx.save(proto, str(target))
    for spec in resolved.values():
        spec["batch"] = "dynamic"
    try:
        feed = uploaded.synthetic_eval_set(meta).head(2)
        outputs = measure.session(target).run(None, feed)
        runs = all(o.shape[:1] == (2,) for o in outputs)
    except Exception:
        runs = False
    if not runs:
        name = next(iter(resolved))
        raise UserError(f"{label} fixes its batch size to {fixed} and does not run with another; export it with a "
                        f"dynamic batch dimension (for example dynamic_axes={{'{name}': {{0: 'batch'}}}}).")
    meta["batch_made_dynamic"] = fixed
    return target


def _output_kind(proto, session) -> str:
    """'logits' (fidelity = same top-1 answer) or 'embedding' (fidelity = cosine), from the first output
    (the same rule as the upload's cheap checks, plus the operator that produces it)."""
    output = session.get_outputs()[0]
    producer = next((n for n in proto.graph.node if output.name in n.output), None)
    return data_fit.output_kind_guess(output.name, list(output.shape), producer.op_type if producer else None)


# ---- Hugging Face (the heavy lifting is in hf_import.py) ---------------------------------------

def _import_hf(store: ArtifactStore, model: dict, meta: dict, scratch: Path, progress: Progress) -> Path:
    from services.engine import hf_import

    if meta.get("hf_repo") and not meta.get("folder"):
        progress(0.02, f"fetching {meta['hf_repo']} from the Hugging Face Hub")
        meta["folder"] = store.relative(hf_import.fetch_from_hub(store.home, meta["hf_repo"]))
    folder = _folder(store, meta)
    # With a CSV attached, a sequence classifier keeps its head: its class logits meet the labels.
    with_text = (meta.get("dataset") or {}).get("kind") == "csv"
    onnx_path = hf_import.import_folder(folder, meta, scratch / "model.onnx", meta.get("source") or folder.name,
                                        progress, use_head=with_text)
    return store.put_file(onnx_path, "models", model["id"], "model.onnx")
