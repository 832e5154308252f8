"""A Hugging Face model folder (uploaded, or fetched from the Hub into EXPLORER_HOME/hf-cache) turned
into a sentence encoder: safetensors weights only, transformers' AutoModel from the local folder
with trust_remote_code=False, the last hidden state mean-pooled over real tokens, exported to ONNX
with a dynamic batch and sequence.

With a CSV data set attached, a model whose config names a sequence-classification head
(architectures: *ForSequenceClassification) is loaded with that head instead
(AutoModelForSequenceClassification) and exported with its class logits, so that it can be scored
against the data set's labels (meta["head"] = "sequence-classification", meta["id2label"]).

A pickle checkpoint (pytorch_model.bin) is read only with torch.load(weights_only=True), which
refuses anything but tensors and plain containers, then rewritten as safetensors and deleted.
Runs in the import job's child process; nothing here runs code from the upload.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from services import imports
from services.engine.families.base import ModelAdapter, Progress
from services.engine.tasks import uploaded
from services.errors import UserError

# What is fetched from the Hub: configuration, safetensors weights and tokenizer files; never code
# and never pickles.
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                "merges.txt", "*.model"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(error).__name__)
    return line[:300].rstrip(".")


SEQUENCE_CLASSIFICATION = "sequence-classification"


def is_sequence_classifier(config) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def import_folder(folder: Path, meta: dict, onnx_path: Path, label: str, progress: Progress,
                  use_head: bool = False) -> Path:
    """Safetensors check, AutoModel (with its sequence-classification head when use_head and the config
    has one), mean pooling or class logits, ONNX export; records input names, vocabulary size, head."""
    from services.engine.export import export_onnx

    progress(0.1, "checking the weights (safetensors only)")
    ensure_safetensors(folder, label)
    progress(0.2, "loading it with transformers (no code from the upload runs)")
    config = load_config(folder)
    head = SEQUENCE_CLASSIFICATION if use_head and is_sequence_classifier(config) else None
    model = load_auto_model(folder, head)
    meta["head"] = head
    meta["architectures"] = list(getattr(config, "architectures", None) or [])
    if head:
        meta["num_labels"] = int(config.num_labels)
        meta["id2label"] = {str(k): str(v) for k, v in (config.id2label or {}).items()}
    meta["input_names"] = _input_names(model, folder)
    meta["vocab_size"] = int(getattr(config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    meta["model_type"] = config.model_type
    adapter = HFUploadAdapter(folder, meta["input_names"], meta["vocab_size"], head)
    progress(0.45, "exporting to ONNX (dynamic batch and sequence)")
    net = adapter.wrap(model)
    try:
        export_onnx(net, adapter, onnx_path)
    except Exception as error:
        raise UserError(f"The {config.model_type} model could not be exported to ONNX: {_first_line(error)}.") from None
    return onnx_path


def fetch_from_hub(home: Path, repo: str) -> Path:
    """snapshot_download into EXPLORER_HOME/hf-cache (HF_HUB_OFFLINE respected: then the cache only)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id=repo, cache_dir=str(imports.hf_cache_dir(home)),
                                      allow_patterns=HUB_PATTERNS))
    except hub_errors.GatedRepoError:
        raise UserError(f"{repo} is gated on the Hugging Face Hub (it needs an accepted licence and a token); "
                        f"upload the model folder as a zip instead.") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"There is no model {repo} on the Hugging Face Hub (or it is private).") from None
    except hub_errors.HfHubHTTPError as error:
        raise UserError(f"The Hugging Face Hub refused to send {repo}: {_first_line(error)}.") from None
    except OSError:  # offline mode without a cached copy, no network, DNS, refused connection
        raise UserError(imports.no_hub_sentence(repo)) from None
    names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    imports.classify(names, f"hf:{repo}")  # config.json and safetensors weights, as for an upload
    return path


def ensure_safetensors(folder: Path, label: str) -> None:
    """Safetensors only. A pickle checkpoint is read with weights_only=True (which refuses anything
    but tensors and plain containers, so no code runs), rewritten as safetensors and deleted."""
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if any(folder.glob("*.safetensors")):
        for path in bins:
            path.unlink()  # never loaded: the safetensors weights are used
        return
    if not bins:
        raise UserError(f"{label} has no model.safetensors weights; save the model with "
                        f"save_pretrained(..., safe_serialization=True).")
    from safetensors.torch import save_file

    state = {}
    for path in bins:
        try:
            part = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"{path.name} is a pickle checkpoint that does not load with weights_only=True (loading "
                            f"it could run code), so it was refused; save the model with safetensors "
                            f"(save_pretrained(..., safe_serialization=True)) and upload that.") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise UserError(f"{path.name} is not a state dict of tensors; save the model with safetensors.")
        state.update(part)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for path in bins:
        path.unlink()
    (folder / "pytorch_model.bin.index.json").unlink(missing_ok=True)


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as error:
        raise UserError(f"transformers cannot use the model's config.json (only architectures built into "
                        f"transformers load; code in an upload never runs): {_first_line(error)}.") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{config.model_type} is an encoder-decoder model; only encoder models (BERT-like) can be "
                        f"imported, scored by their mean-pooled output.")
    return config


def load_auto_model(folder: Path, head: str | None = None):
    """transformers' AutoModel (or AutoModelForSequenceClassification for head='sequence-classification')
    from the local folder: safetensors only, no remote code, no network."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = load_config(folder)
    auto = AutoModelForSequenceClassification if head == SEQUENCE_CLASSIFICATION else AutoModel
    options = dict(config=config, trust_remote_code=False, local_files_only=True, use_safetensors=True)
    try:
        try:  # eager attention exports to plain ONNX operators
            model = auto.from_pretrained(str(folder), attn_implementation="eager", **options)
        except ValueError:
            model = auto.from_pretrained(str(folder), **options)
    except Exception as error:
        raise UserError(f"transformers could not load the {config.model_type} model: {_first_line(error)}.") from None
    return model.eval()


def _input_names(encoder, folder: Path) -> list[str]:
    accepted = inspect.signature(encoder.forward).parameters
    if "input_ids" not in accepted or "attention_mask" not in accepted:
        raise UserError(f"The {encoder.config.model_type} model does not take token ids with an attention mask, "
                        f"so it cannot be scored on text.")
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted:
        tokenizer = uploaded.load_tokenizer(folder)
        wanted = ("token_type_ids" in tokenizer.model_input_names if tokenizer is not None
                  else getattr(encoder.config, "type_vocab_size", 0) > 0)
        if wanted:
            names.append("token_type_ids")
    return names


class MeanPooled(nn.Module):
    """The encoder's last hidden state averaged over real tokens: a sentence embedding."""

    def __init__(self, encoder: nn.Module, input_names):
        super().__init__()
        self.encoder = encoder
        self.input_names = tuple(input_names)

    def forward(self, *args):
        feed = dict(zip(self.input_names, args))
        output = self.encoder(**feed)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)


class ClassLogits(nn.Module):
    """A sequence classifier's class logits (batch, classes): what it is scored on against labels."""

    def __init__(self, classifier: nn.Module, input_names):
        super().__init__()
        self.classifier = classifier
        self.input_names = tuple(input_names)

    def forward(self, *args):
        output = self.classifier(**dict(zip(self.input_names, args)))
        logits = getattr(output, "logits", None)
        return output[0] if logits is None else logits


class HFUploadAdapter(ModelAdapter):
    """An uploaded Hugging Face encoder: its module is rebuilt from the upload folder's safetensors,
    mean-pooled (an embedding) or, with head='sequence-classification', its class logits."""

    def __init__(self, folder: Path, input_names, vocab_size: int, head: str | None = None):
        self.folder = Path(folder)
        self.model_id = self.folder.name
        self.input_names = tuple(input_names)
        self.vocab_size = vocab_size
        self.head = head
        self.output_kind = "logits" if head else "embedding"
        self.output_names = ("logits",) if head else ("embedding",)
        self.dynamic_axes = ({n: {0: "batch", 1: "sequence"} for n in self.input_names}
                             | {self.output_names[0]: {0: "batch"}})

    def wrap(self, model: nn.Module) -> nn.Module:
        return (ClassLogits(model, self.input_names) if self.head else MeanPooled(model, self.input_names)).eval()

    def build(self):
        return self.wrap(load_auto_model(self.folder, self.head))

    def create(self, progress: Progress):
        return self.build()

    def load(self, path: Path):  # the weights are the upload's own safetensors, not a weights.pt
        return self.build()

    def example_inputs(self) -> tuple:
        feed, _ = uploaded.text_feed(self.folder, list(self.input_names), self.vocab_size)
        return tuple(torch.from_numpy(feed[n][:2]) for n in self.input_names)

    def mask_token_id(self) -> int | None:
        """The upload's own mask token, if its tokenizer has one (masked-reconstruction recovery)."""
        return getattr(uploaded.load_tokenizer(self.folder), "mask_token_id", None)

    def encode(self, texts: list[str], tokenizer_file: Path | str | None = None) -> dict:
        """Texts as the model's inputs, padded or cut to uploaded.MAX_TOKENS as the scored texts are: by
        the upload's own tokenizer, or by `tokenizer_file` (a tokenizer.json a step rebuilt, vocab.trim)."""
        import numpy as np

        if tokenizer_file is None:
            feed, _ = uploaded.text_feed(self.folder, list(self.input_names), self.vocab_size, count=len(texts),
                                         texts=list(texts))
            return feed
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        original = uploaded.load_tokenizer(self.folder)
        pad_token = getattr(original, "pad_token", None) or "[PAD]"
        pad_id = tokenizer.token_to_id(pad_token)
        tokenizer.enable_truncation(uploaded.MAX_TOKENS)
        tokenizer.enable_padding(length=uploaded.MAX_TOKENS, pad_id=0 if pad_id is None else pad_id,
                                 pad_token=pad_token)
        encodings = tokenizer.encode_batch(list(texts))
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                   "token_type_ids": [e.type_ids for e in encodings]}
        return {name: np.array(columns[name], dtype=np.int64) for name in self.input_names}
