"""distill.student side by side: smaller students of MiniLM and of the digits CNN x4, against the
original measured in the same run (ratios), and, for the CNN, against the same small architecture
trained from scratch on the labels only (does distillation help?).

    .venv/bin/python bench/distill.py [--part minilm|digits|all] [--budgets 150,600] [--layers 3,2]

Writes bench/out/distill.md. MiniLM is scored on the 256 scored pydoc pairs (recall@1, and
fidelity = cosine to the original's embedding), never trained on; the students train on the
fitting paragraphs plus standard-library docstrings. Times are wall-clock seconds on whatever the
machine gives: compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "distill.md"


def _context(model_id: str, task: str, architecture: str, scratch: Path):
    from services.engine import pipeline, zoo

    return pipeline.StepContext(model_id=model_id, scratch=scratch, progress=lambda f, m: None,
                                model={"id": model_id, "task": task}, task=task, adapter=zoo.get_adapter(model_id),
                                architecture=architecture)


def _params(method, **given) -> dict:
    return {p.name: p.default for p in method.params} | given


def _quantize(source: Path, target: Path, scratch: Path) -> Path:
    from services.engine.methods import REGISTRY

    method = REGISTRY["quantize.dynamic"]
    method.apply(source, target, _params(method), _context("minilm-l6", "pydoc-retrieval", "text-transformer",
                                                           scratch))
    return target


def minilm(budgets: list[int], layer_counts: list[int], scratch: Path) -> list[str]:
    import torch

    from services.engine import measure, tasks, zoo
    from services.engine.export import export_onnx
    from services.engine.methods import REGISTRY
    from services.engine.methods.distill_student import drop_layers
    from services.engine.tasks import pydoc_retrieval

    method = REGISTRY["distill.student"]
    trim = REGISTRY.get("vocab.trim")
    adapter = zoo.get_adapter("minilm-l6")
    teacher = adapter.create(lambda f, m: None)
    evaluation = pydoc_retrieval.eval_set()
    baseline = export_onnx(teacher, adapter, scratch / "original.onnx")
    # (label, onnx path, eval set as that model reads it, parameters in torch, training seconds)
    variants = [("original fp32", baseline, evaluation, None),
                ("original → quantize.dynamic", _quantize(baseline, scratch / "original.q.onnx", scratch), evaluation,
                 None)]
    for layers in layer_counts:
        untrained = copy.deepcopy(teacher)
        drop_layers(untrained, layers)
        variants.append((f"{layers} layers, untrained (the original's layers, no distillation)",
                         export_onnx(untrained, adapter, scratch / f"l{layers}-untrained.onnx"), evaluation, 0.0))
        for steps in budgets:
            net = copy.deepcopy(teacher)
            context = _context("minilm-l6", "pydoc-retrieval", "text-transformer", scratch)
            started = time.perf_counter()
            method.apply(net, _params(method, layers=layers, steps=steps), context)
            seconds = time.perf_counter() - started
            print(f"  {context.notes[-1]}", flush=True)
            name = f"l{layers}-s{steps}"
            path = export_onnx(net, adapter, scratch / f"{name}.onnx")
            label = f"{layers} layers, {steps} steps"
            variants.append((label, path, evaluation, seconds))
            variants.append((f"{label} → quantize.dynamic", _quantize(path, scratch / f"{name}.q.onnx", scratch),
                             evaluation, seconds))
            if trim is not None and steps == max(budgets):
                trimmed = copy.deepcopy(net)
                trim_context = _context("minilm-l6", "pydoc-retrieval", "text-transformer", scratch / name)
                trim_context.scratch.mkdir(exist_ok=True)
                trim.apply(trimmed, _params(trim), trim_context)
                feed = trim_context.reencode(trim_context.fit_set()).inputs  # ids of the trimmed vocabulary
                path = export_onnx(trimmed, adapter, scratch / f"{name}.trim.onnx",
                                   tuple(torch.from_numpy(feed[n][:2]) for n in adapter.input_names))
                variants.append((f"{label} → vocab.trim → quantize.dynamic",
                                 _quantize(path, scratch / f"{name}.trim.q.onnx", scratch),
                                 trim_context.reencode(evaluation), seconds))
            del net

    print("timing every variant side by side", flush=True)
    latencies = measure.measure_latency([v[1] for v in variants], [v[2] for v in variants])
    reference = measure.run_outputs(measure.session(baseline), evaluation)
    base = latencies[0]
    lines = [
        "## all-MiniLM-L6-v2 students (pydoc-retrieval: 256 scored pairs, never trained on)",
        "",
        "| variant | params | size | × faster, batch 1 | × faster, batch 32 | recall@1 | fidelity mean / worst "
        "| training s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (label, path, evaluation_of, seconds), latency in zip(variants, latencies):
        outputs = measure.run_outputs(measure.session(path), evaluation_of)
        score = tasks.score("pydoc-retrieval", "minilm-l6", "embedding", evaluation_of, outputs, reference)
        counts = measure.parameter_counts(path)
        size = measure.file_sizes(path)["size_bytes"] / 1e6
        fast1 = base["latency_ms"]["p50"] / latency["latency_ms"]["p50"]
        fast32 = base["batch_latency_ms"]["p50"] / latency["batch_latency_ms"]["p50"]
        lines.append(f"| {label} | {counts['params'] / 1e6:.1f} M | {size:.1f} MB | {fast1:.2f} | {fast32:.2f} | "
                     f"{score['score']:.3f} | {score['fidelity']:.3f} / {score['fidelity_worst']:.3f} | "
                     f"{'' if seconds is None else f'{seconds:.0f}'} |")
    return lines


def digits(budgets: list[int], seeds: list[int], scratch: Path) -> list[str]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from services.engine import distill, zoo
    from services.engine.methods import REGISTRY
    from services.engine.methods.distill_student import classifier_loss, narrow_cnn, reinitialize
    from services.engine.tasks.digits import digits_data

    method = REGISTRY["distill.student"]
    data = digits_data()
    adapter = zoo.get_adapter("digits-cnn-x4")
    teacher = adapter.create(lambda f, m: None)
    example = adapter.example_inputs()

    def accuracy(net) -> float:
        with torch.no_grad():
            return float(np.mean(net(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test))

    def train(net, seed, loss, hidden, steps):
        batches = distill.batches_from_arrays([data.x_train], 32, seed, labels=data.y_train)
        params = _params(method)
        distill.train(net, teacher, batches, loss, steps=steps, lr=params["lr"], hidden_pairs=[(h, h) for h in hidden],
                      hidden_weight=params["hidden_weight"], seed=seed)
        return net

    labels_only = lambda student, _teacher, batch: F.cross_entropy(student, batch.labels)  # noqa: E731
    defaults = _params(method)
    distilled_loss = classifier_loss(defaults["temperature"], defaults["label_weight"])

    def variants(width, seed, steps):
        torch.manual_seed(seed)
        yield "distill.student (the original's strongest channels, then distilled)", _apply(width, seed, steps)
        for start, loss, label in (("teacher", labels_only, "the original's strongest channels, labels only"),
                                   ("random", labels_only, "from scratch, labels only"),
                                   ("random", distilled_loss, "from scratch, distilled")):
            net = copy.deepcopy(teacher)
            torch.manual_seed(seed)
            hidden = narrow_cnn(net, width, example)
            if start == "random":
                reinitialize(net)
            yield label, train(net, seed, loss, hidden if loss is distilled_loss else [], steps)

    def _apply(width, seed, steps):
        net = copy.deepcopy(teacher)
        method.apply(net, _params(method, width=width, steps=steps, seed=seed),
                     _context("digits-cnn-x4", "digits", "cnn", scratch))
        return net

    teacher_accuracy = accuracy(teacher)
    params_teacher = sum(p.numel() for p in teacher.parameters())
    lines = ["## digits-cnn-x4 students (540 test images; the original: "
             f"{teacher_accuracy:.3f} accuracy, {params_teacher:,} parameters)", "",
             f"Batch 32, the method's default learning rate and losses; seeds {', '.join(map(str, seeds))}: "
             "mean (min–max).", "",
             "| width | steps | variant | params | accuracy | Δ vs original (points) | agreement with the original |",
             "|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        teacher_top = teacher(torch.from_numpy(data.x_test)).argmax(1)

    def agreement(net) -> float:
        with torch.no_grad():
            return float((net(torch.from_numpy(data.x_test)).argmax(1) == teacher_top).float().mean())

    for width in (0.5, 0.25):
        for steps in budgets:
            results: dict[str, list] = {}
            params = {}
            for seed in seeds:
                for label, net in variants(width, seed, steps):
                    results.setdefault(label, []).append((accuracy(net), agreement(net)))
                    params[label] = sum(p.numel() for p in net.parameters())
                print(f"  width {width}, {steps} steps, seed {seed} done", flush=True)
            lines += _digits_rows(width, steps, results, params, teacher_accuracy)
        reference_id = {0.5: "digits-cnn-x2", 0.25: "digits-cnn"}[width]
        builtin = zoo.get_adapter(reference_id).create(lambda f, m: None)
        label = f"same architecture ({reference_id}), its own training: labels, lr 3e-3, batch 64, seed 0"
        lines += _digits_rows(width, 600, {label: [(accuracy(builtin), agreement(builtin))]},
                              {label: sum(p.numel() for p in builtin.parameters())}, teacher_accuracy)
    return lines


def _digits_rows(width, steps, results, params, teacher_accuracy) -> list[str]:
    rows = []
    for label, values in results.items():
        accuracies = [a for a, _ in values]
        agreements = [g for _, g in values]
        spread = f" ({min(accuracies):.3f}–{max(accuracies):.3f})" if len(values) > 1 else ""
        rows.append(f"| {width:g} | {steps} | {label} | {params[label]:,} | {statistics.mean(accuracies):.3f}{spread} "
                    f"| {100 * (statistics.mean(accuracies) - teacher_accuracy):+.1f} | "
                    f"{statistics.mean(agreements):.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("minilm", "digits", "all"), default="all")
    parser.add_argument("--budgets", default="150,600", help="MiniLM step budgets, comma-separated")
    parser.add_argument("--layers", default="3,2", help="MiniLM student depths, comma-separated")
    parser.add_argument("--digits-steps", default="150,600", help="digits step budgets, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    lines = ["# distill.student", "",
             f"Machine: {torch.get_num_threads()} torch threads for training on a 2-core machine shared with other "
             "jobs (training seconds are noisy); ONNX Runtime timed with 1 thread, all variants of a table side by "
             "side in one run.", ""]
    try:
        if args.part in ("digits", "all"):
            lines += digits([int(b) for b in args.digits_steps.split(",")], [int(s) for s in args.seeds.split(",")],
                            scratch) + [""]
            print("\n".join(lines), flush=True)
        if args.part in ("minilm", "all"):
            lines += minilm([int(b) for b in args.budgets.split(",")], [int(n) for n in args.layers.split(",")],
                            scratch) + [""]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if args.part != "all" and OUT.exists():  # keep the other part's table
        kept = OUT.read_text(encoding="utf-8").split("\n## ")
        mine = "all-MiniLM" if args.part == "minilm" else "digits-cnn"
        lines += ["## " + section for section in kept[1:] if not section.startswith(mine)]
    OUT.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
