"""Take a result to the Hugging Face Hub: a Hub-ready folder (zip) and, with a token and a network,
publishing it with huggingface-hub.

The folder holds the compressed ONNX file, the recipe that made it, its measured metrics, the
tokenizer a trimmed vocabulary needs, and a model card whose metadata carries the measurements in
the Hub's model-index format (huggingface_hub.ModelCardData / EvalResult), so the Hub shows them.
Torch-free: the web process builds it.
"""
from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

from services.errors import UserError

# What the Hub calls our tasks (model-index task types), and where the built-in models come from.
TASK_TYPES = {"digits": "image-classification", "pydoc-retrieval": "sentence-similarity",
              "spoken-digits": "automatic-speech-recognition", "speaker-id": "audio-classification",
              "fidelity": "feature-extraction", "your-data": "other"}
BASE_MODELS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def model_card(run: dict, model: dict):
    """The run's model card: what was done, what it measured, in the card's text and its metadata."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from services.api import summary_sentence
    from services.catalog import TASKS

    metrics, baseline, task = run["metrics"], run["baseline"], run["recipe"]["task"]
    dataset = {"dataset_type": task, "dataset_name": TASKS.get(task, {}).get("description", task)[:120],
               "task_type": TASK_TYPES.get(task, "other")}
    results = [EvalResult(metric_type=metrics["score_name"], metric_value=round(metrics["score"], 6), **dataset)]
    if "fidelity" in metrics and metrics["score_name"] != "fidelity":
        results.append(EvalResult(metric_type="fidelity", metric_name="agreement with the original model",
                                  metric_value=round(metrics["fidelity"], 6), **dataset))
    methods = [step["method"] for step in run["recipe"]["steps"]]
    data = ModelCardData(
        model_name=f"{model['id']}-compressed-{run['id'][:8]}", library_name="onnx",
        base_model=BASE_MODELS.get(model["id"]), eval_results=results,
        tags=["onnx", "model-compression", "compression-explorer", *methods],
        compression={"recipe": run["recipe"], "size_bytes": metrics["size_bytes"],
                     "original_size_bytes": baseline["size_bytes"], "latency_ms_p50": metrics["latency_ms"]["p50"],
                     "original_latency_ms_p50": baseline["latency_ms"]["p50"]},
    )
    steps = "\n".join(f"{i + 1}. `{step['method']}` {json.dumps(step['params'])}" for i, step in enumerate(run["recipe"]["steps"]))
    text = f"""---
{data.to_yaml()}
---

# {model['name']}, compressed

Made with Compression Explorer from `{model['id']}`: {summary_sentence(metrics, baseline)}.

| | original | compressed |
|---|---|---|
| ONNX file | {baseline['size_bytes']:,} bytes | {metrics['size_bytes']:,} bytes |
| parameters (nonzero) | {baseline['nonzero_params']:,} | {metrics['nonzero_params']:,} |
| latency p50, batch 1 (ONNX Runtime, {run['runner'].get('threads', 1) if isinstance(run.get('runner'), dict) else 1} thread) | {baseline['latency_ms']['p50']:.3f} ms | {metrics['latency_ms']['p50']:.3f} ms |
| {metrics['score_name']} on `{task}` | {baseline['score']:.4f} | {metrics['score']:.4f} |

## Recipe

{steps}

The full recipe is in `recipe.json`, every measurement in `metrics.json`. Scores come from the exported
ONNX file on samples no compression step fitted on.
"""
    return ModelCard(text)


def folder_files(run: dict, model: dict, read_artifact, read_file) -> dict[str, bytes]:
    """File name -> bytes of the Hub-ready folder."""
    files = {"model.onnx": read_artifact(run), "recipe.json": json.dumps(run["recipe"], indent=2).encode(),
             "metrics.json": json.dumps({"metrics": run["metrics"], "baseline": run["baseline"]}, indent=2).encode(),
             "README.md": str(model_card(run, model)).encode()}
    if run.get("files", {}).get("tokenizer"):
        files["tokenizer.json"] = read_file(run, "tokenizer")
    return files


def folder_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def publish(files: dict[str, bytes], repo_id: str, token: str, scratch: Path, endpoint: str | None = None) -> str:
    """Create (or reuse) the model repository and upload the folder; returns its URL."""
    from huggingface_hub import HfApi

    if not repo_id or "/" not in repo_id or repo_id.count("/") > 1:
        raise UserError(f"Name the Hub repository as owner/name (for example you/minilm-int8); got {repo_id!r}.")
    if not token:
        raise UserError("Publishing needs a Hugging Face access token with write permission.")
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        try:
            hub = HfApi(endpoint=endpoint, token=token)
            url = hub.create_repo(repo_id, repo_type="model", exist_ok=True)
            # an earlier upload's files (another run's tokenizer.json) must not stay beside this model
            hub.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload from Compression Explorer",
                              delete_patterns=["*.onnx", "*.json", "README.md"])
        except Exception as error:  # noqa: BLE001 - network, auth and Hub errors all come back as one sentence
            raise UserError(f"Could not publish to the Hugging Face Hub ({type(error).__name__}: {str(error)[:200]}). "
                            "Without a network (or with a token that cannot write there), download the Hub folder "
                            "and upload it from a machine that can.") from None
    return str(url)
