"""The quantizers side by side: fp32, quantize.dynamic, quantize.static (each calibration method) and
quantize.int4_weights, on digits-cnn-x4 and minilm-l6. Every variant is made by the method's own
`apply`, then all variants of a model are timed in ONE interleaved ONNX Runtime session set
(measure.measure_latency, fixed threads), so the ratios to fp32 share the same machine noise.

    .venv/bin/python bench/quantize.py [--models digits-cnn-x4 minilm-l6] [--seconds 3]

Writes bench/out/quantize.md.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {"digits-cnn-x4": "digits", "minilm-l6": "pydoc-retrieval"}
FFN_OUTPUTS = [f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in range(6)]

# label -> (method, params); None = the fp32 original
VARIANTS = {
    "digits-cnn-x4": {
        "fp32": None,
        "dynamic (default: MatMul+Gather, per-channel)": ("quantize.dynamic", {}),
        "dynamic with Conv": ("quantize.dynamic", {"operators": ["MatMul", "Conv"]}),
        "static MinMax (default)": ("quantize.static", {}),
        "static Entropy": ("quantize.static", {"calibrate_method": "Entropy"}),
        "static Percentile 99.999": ("quantize.static", {"calibrate_method": "Percentile"}),
        "int4 block 32 (default)": ("quantize.int4_weights", {}),
        "int4 block 128": ("quantize.int4_weights", {"block_size": 128}),
    },
    "minilm-l6": {
        "fp32": None,
        "dynamic (default: MatMul+Gather, per-channel)": ("quantize.dynamic", {}),
        "static MinMax (default)": ("quantize.static", {}),
        "static Entropy": ("quantize.static", {"calibrate_method": "Entropy"}),
        "static Percentile 99.999": ("quantize.static", {"calibrate_method": "Percentile"}),
        "static MinMax, FFN output layers float": ("quantize.static", {"keep_float_nodes": FFN_OUTPUTS}),
        "int4 block 32 (default), embeddings fp32": ("quantize.int4_weights", {}),
        "int4 block 128, embeddings fp32": ("quantize.int4_weights", {"block_size": 128}),
        "int4 block 32 + embeddings (Gather)": ("quantize.int4_weights", {"quantize_embeddings": True}),
        "int4 block 128 + embeddings (Gather)": ("quantize.int4_weights",
                                                 {"block_size": 128, "quantize_embeddings": True}),
    },
}


def bench_model(model_id: str, home: Path, seconds: float) -> list[str]:
    from services.engine import measure, pipeline, tasks
    from services.engine.methods import REGISTRY
    from services.recipes import validate_recipe
    from storage import ArtifactStore

    store = ArtifactStore(home)
    task = TASKS[model_id]
    row = {"id": model_id, "format": "torch", "task": task, "status": "new", "artifact": None}
    model = {**row, **pipeline.prepare(store, row, lambda f, m: None)["model_update"]}
    source = store.resolve(model["artifact"])
    scratch = home / "variants"
    scratch.mkdir(exist_ok=True)
    paths, made_in = {}, {}
    for index, (label, variant) in enumerate(VARIANTS[model_id].items()):
        if variant is None:
            paths[label] = source
            continue
        method, params = variant
        clean = validate_recipe({"steps": [{"method": method, "params": params}]}, model, [task])["steps"][0]["params"]
        context = pipeline.StepContext(model_id=model_id, scratch=scratch, progress=lambda f, m: None, model=model,
                                       task=task, home=home)
        started = time.perf_counter()
        REGISTRY[method].apply(source, scratch / f"v{index}.onnx", clean, context)
        made_in[label] = time.perf_counter() - started
        paths[label] = scratch / f"v{index}.onnx"
        print(f"  {label}: made in {made_in[label]:.1f} s", flush=True)

    evaluation = tasks.eval_set(task, model_id)
    kind = "embedding" if model_id == "minilm-l6" else "logits"
    latencies = measure.measure_latency(list(paths.values()), evaluation, seconds=seconds)
    reference = measure.run_outputs(measure.session(source), evaluation)
    base = latencies[0]
    batch = base["batch_latency_ms"]["batch"]
    lines = [f"### {model_id} ({task}; batch-N = {batch}; fidelity = "
             f"{'cosine to the fp32 embedding' if kind == 'embedding' else 'argmax agreement with fp32'})", "",
             f"| variant | size | × smaller | batch 1 ms | × faster, batch 1 | batch {batch} ms "
             f"| × faster, batch {batch} | {'recall@1' if kind == 'embedding' else 'accuracy'} "
             "| fidelity mean | fidelity worst | made in |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (label, path), latency in zip(paths.items(), latencies):
        outputs = measure.run_outputs(measure.session(path), evaluation)
        scores = tasks.score(task, model_id, kind, evaluation, outputs, reference)
        size = path.stat().st_size
        single, many = latency["latency_ms"]["p50"], latency["batch_latency_ms"]["p50"]
        worst = f"{scores['fidelity_worst']:.3f}" if kind == "embedding" else "–"
        lines.append(
            f"| {label} | {size / 2**20:.2f} MB | {source.stat().st_size / size:.2f} | {single:.3f} | "
            f"{base['latency_ms']['p50'] / single:.2f} | {many:.1f} | {base['batch_latency_ms']['p50'] / many:.2f} | "
            f"{scores['score']:.4f} | {scores['fidelity']:.4f} | {worst} | "
            f"{f'{made_in[label]:.1f} s' if label in made_in else '–'} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per variant")
    args = parser.parse_args()
    import onnxruntime

    from services.engine import measure

    sections = []
    for model_id in args.models:
        home = Path(tempfile.mkdtemp(prefix="explorer-quantize-"))
        try:
            print(f"{model_id}:", flush=True)
            sections += bench_model(model_id, home, args.seconds)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    header = [
        "# Quantizers side by side",
        "",
        f"`bench/quantize.py`, {time.strftime('%Y-%m-%d')}, ONNX Runtime {onnxruntime.__version__}, "
        f"{measure.BENCH_THREADS} intra-op thread(s), CPU {platform.processor() or platform.machine()}. "
        "Ratios are to the fp32 model timed in the same interleaved rounds; the machine was shared with "
        "other jobs, so single timings are noisy (compare within a table, not across runs). Scores are on the "
        "task's scored split; static calibration used the fitting split only.",
        "",
    ]
    text = "\n".join(header + sections)
    out = ROOT / "bench" / "out" / "quantize.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
