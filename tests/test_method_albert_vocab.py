"""share.embedding, share.layers and vocab.trim on the real minilm-l6 (and share.layers on a tiny
speech encoder built directly): what each reduces, how close the output stays, that the ONNX
export loads in ONNX Runtime, and that bad parameters and unsuitable models are refused.
minilm-l6 is prepared once for the module (~15 s)."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from services.engine import measure, pipeline, zoo
from services.engine.export import export_onnx
from services.engine.families import minilm
from services.engine.methods import REGISTRY
from services.engine.tasks import pydoc_retrieval
from services.errors import UserError
from services.recipes import validate_recipe
from storage import ArtifactStore

pytestmark = pytest.mark.slow

MODEL = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "new", "artifact": None}
CNN = {"id": "digits-cnn", "format": "torch", "task": "digits"}
LAYER_PARAMS = 1_774_464  # one MiniLM encoder layer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    home = tmp_path_factory.mktemp("albert-home")
    store = ArtifactStore(home)
    model = {**MODEL, **pipeline.prepare(store, MODEL, lambda f, m: None)["model_update"]}
    net = pipeline._load_torch_model(store, "minilm-l6")
    return store, model, net


@pytest.fixture
def net(prepared):
    return copy.deepcopy(prepared[2])


def _context(prepared, tmp_path, model_id="minilm-l6", architecture="text-transformer", adapter="default"):
    store, model, _ = prepared
    return pipeline.StepContext(model_id=model_id, scratch=tmp_path, progress=lambda f, m: None, model=model,
                                task="pydoc-retrieval", home=store.home,
                                adapter=zoo.get_adapter("minilm-l6") if adapter == "default" else adapter,
                                architecture=architecture)


def _params(method: str, **given) -> dict:
    return validate_recipe({"steps": [{"method": method, "params": given}]}, MODEL,
                           ["pydoc-retrieval"])["steps"][0]["params"]


def _scored_texts(n=48):
    return [query for _, query, _ in pydoc_retrieval.test_pairs()[:n]]


def _cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _onnx_outputs(path, texts, tokenizer_file=None):
    return measure.session(path).run(None, minilm.encode(texts, tokenizer_file))[0]


def _onnx_params(path) -> int:
    return measure.parameter_counts(path)["params"]


# ---- share.embedding -------------------------------------------------------------------------

def test_share_embedding_shrinks_the_table_and_a_mild_setting_stays_close(prepared, net, tmp_path):
    store, model, _ = prepared
    context = _context(prepared, tmp_path)
    REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=256), context)
    factorized = net.bert.embeddings.word_embeddings
    table, projection = factorized.table, factorized.projection
    assert tuple(table.weight.shape) == (30522, 256) and tuple(projection.weight.shape) == (384, 256)
    path = export_onnx(net, zoo.get_adapter("minilm-l6"), tmp_path / "factorized.onnx")
    baseline = store.resolve(model["artifact"])
    # 30522 × 384 became 30522 × 256 + 256 × 384
    assert _onnx_params(baseline) - _onnx_params(path) == 30522 * 384 - (30522 * 256 + 256 * 384)
    assert {"Gather", "MatMul"} <= {node.op_type for node in onnx.load(str(path)).graph.node}
    texts = _scored_texts()  # paragraphs the token counts never saw
    cosine = _cosine(_onnx_outputs(path, texts), _onnx_outputs(baseline, texts))
    assert cosine.mean() > 0.98 and cosine.min() > 0.9, (cosine.mean(), cosine.min())
    assert "30,522 × 256 + 256 × 384" in context.notes[0]


def test_weighting_by_token_use_keeps_common_words_better_than_plain_svd(prepared, tmp_path):
    texts = _scored_texts(24)
    feed = minilm.encode(texts)
    inputs = [torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    with torch.no_grad():
        reference = prepared[2](*inputs).numpy()
        means = {}
        for weighted in (True, False):
            net = copy.deepcopy(prepared[2])
            REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=128, weight_by_use=weighted),
                                              _context(prepared, tmp_path))
            means[weighted] = _cosine(net(*inputs).numpy(), reference).mean()
    assert means[True] > means[False] + 0.1, means


def test_exact_tokens_keep_the_most_used_tokens_vectors_and_lift_the_worst_paragraph(prepared, net, tmp_path):
    store, model, original = prepared
    context = _context(prepared, tmp_path)
    REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64, exact_tokens=300), context)
    factorized = net.bert.embeddings.word_embeddings
    counts = np.bincount(np.concatenate([ids[mask.astype(bool)] for ids, mask in zip(
        *(lambda f: (f["input_ids"], f["attention_mask"]))(minilm.encode(pydoc_retrieval.fit_paragraphs())))]),
        minlength=30522)
    most_used = torch.from_numpy(np.argsort(-counts, kind="stable")[:300])
    rare = torch.from_numpy(np.flatnonzero(counts == 0)[:300])
    table = original.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.allclose(factorized(most_used), table[most_used], atol=1e-5)  # exactly the original vectors
        assert not torch.allclose(factorized(rare), table[rare], atol=1e-2)  # the others approximated
    path = export_onnx(net, zoo.get_adapter("minilm-l6"), tmp_path / "exact.onnx")
    # 300 full-width rows (and an all-zero row 0) on top of the factorized table; the id → row map is int16
    assert _onnx_params(path) == 30522 * 64 + 64 * 384 + 301 * 384 + LAYER_PARAMS * 6 + (
        _onnx_params(store.resolve(model["artifact"])) - 30522 * 384 - LAYER_PARAMS * 6)
    texts = _scored_texts(96)
    baseline = _onnx_outputs(store.resolve(model["artifact"]), texts)
    plain = copy.deepcopy(original)
    REGISTRY["share.embedding"].apply(plain, _params("share.embedding", E=64), _context(prepared, tmp_path))
    with_exact = _cosine(_onnx_outputs(path, texts), baseline)
    without = _cosine(_onnx_outputs(export_onnx(plain, zoo.get_adapter("minilm-l6"), tmp_path / "plain.onnx"), texts),
                      baseline)
    assert with_exact.min() > without.min() + 0.02 and with_exact.mean() > without.mean(), (with_exact, without)
    assert "300 tokens the fitting texts use most" in context.notes[0]


def test_exact_tokens_without_weighting_says_the_svd_was_plain(prepared, net, tmp_path):
    context = _context(prepared, tmp_path)
    REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64, exact_tokens=100, weight_by_use=False),
                                      context)
    assert "the 100 tokens the fitting texts use most" in context.notes[0] and "weighted by" not in context.notes[0]


def test_exact_tokens_say_why_when_the_task_gives_no_token_ids(prepared, net, tmp_path):
    from services.engine.tasks.base import EvalSet

    context = _context(prepared, tmp_path)
    # a task whose fitting inputs are features, not ids of this table (an uploaded model's own data, say)
    context._fit_set = EvalSet(inputs={"features": np.zeros((4, 8), np.float32)}, labels=None)
    with pytest.raises(UserError, match="this task's inputs are not token ids of this table; set exact_tokens to 0"):
        REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64, exact_tokens=100), context)


def test_vocab_trim_after_exact_tokens_keeps_their_vectors(prepared, net, tmp_path):
    context = _context(prepared, tmp_path)
    REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64, exact_tokens=200), context)
    texts = _scored_texts(16)
    feed = minilm.encode(texts)
    inputs = [torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    with torch.no_grad():
        before = net(*inputs)
    REGISTRY["vocab.trim"].apply(net, _params("vocab.trim", unseen="pieces"), context)
    trimmed_feed = minilm.encode(texts, context.tokenizer_file)
    with torch.no_grad():
        after = net(*[torch.from_numpy(trimmed_feed[name]) for name in ("input_ids", "attention_mask", "token_type_ids")])
    kept = net.bert.embeddings.word_embeddings
    assert kept.table.num_embeddings == kept.slots.numel() < 30522
    spelled = [[e.tokens for e in minilm.tokenizer(f).encode_batch(texts)] for f in (None, str(context.tokenizer_file))]
    same = np.array([a == b for a, b in zip(*spelled)])  # paragraphs whose every token was kept
    assert same.any() and torch.allclose(before[torch.from_numpy(same)], after[torch.from_numpy(same)], atol=1e-5)


def test_share_embedding_refuses_bad_widths_and_models_without_a_word_table(prepared, net, tmp_path):
    context = _context(prepared, tmp_path)
    with pytest.raises(UserError, match="smaller than the model's hidden size \\(384\\)"):
        REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=384), context)
    with pytest.raises(UserError, match="'E' must be between 8 and 1024"):
        _params("share.embedding", E=4)
    REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64), context)
    with pytest.raises(UserError, match="already factorized"):
        REGISTRY["share.embedding"].apply(net, _params("share.embedding", E=64), context)
    with pytest.raises(UserError, match="no word-embedding table"):
        REGISTRY["share.embedding"].apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), _params("share.embedding"),
                                          context)


# ---- share.layers ----------------------------------------------------------------------------

def test_share_layers_stores_each_shared_layer_once_in_the_onnx_file(prepared, net, tmp_path):
    store, model, _ = prepared
    context = _context(prepared, tmp_path)
    REGISTRY["share.layers"].apply(net, _params("share.layers", group_size=2), context)
    layers = net.bert.encoder.layer
    assert len(layers) == 6 and len({id(layer) for layer in layers}) == 3 and layers[0] is layers[1]
    path = export_onnx(net, zoo.get_adapter("minilm-l6"), tmp_path / "shared.onnx")
    baseline = store.resolve(model["artifact"])
    # TorchScript's exporter names a weight once however often the module runs: 3 layers fewer in the file
    assert _onnx_params(baseline) - _onnx_params(path) == 3 * LAYER_PARAMS
    assert path.stat().st_size < baseline.stat().st_size - 3 * LAYER_PARAMS * 4 * 0.99
    texts = _scored_texts(8)
    feed = minilm.encode(texts)
    with torch.no_grad():
        expected = net(*(torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
    got = _onnx_outputs(path, texts)
    assert np.allclose(got, expected.numpy(), atol=1e-4)  # the export runs the shared layer at every position
    # Without retraining sharing moves the output far away; the note says how to recover.
    assert _cosine(got, _onnx_outputs(baseline, texts)).mean() < 0.9
    assert "recover with distillation" in context.notes[0]
    # Every user of a shared weight reads it directly (not through an Identity), so ONNX Runtime's
    # quantizer turns every MatMul to int8 and the shared weights stay stored once.
    quantize = REGISTRY["quantize.dynamic"]
    quantized = tmp_path / "shared-int8.onnx"
    quantize.apply(path, quantized, validate_recipe({"steps": [{"method": quantize.name}]}, MODEL,
                                                    ["pydoc-retrieval"])["steps"][0]["params"], context)
    ops = [node.op_type for node in onnx.load(str(quantized)).graph.node]
    assert ops.count("MatMulInteger") == 36 and quantized.stat().st_size < 0.3 * path.stat().st_size


def test_share_layers_default_init_is_the_one_closer_to_the_original(prepared, tmp_path):
    texts = _scored_texts(16)
    feed = minilm.encode(texts)
    inputs = [torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    default = REGISTRY["share.layers"].param("init").default
    with torch.no_grad():
        reference = prepared[2](*inputs).numpy()
        closeness = {}
        for init in ("first", "average"):
            net = copy.deepcopy(prepared[2])
            REGISTRY["share.layers"].apply(net, _params("share.layers", group_size=2, init=init),
                                           _context(prepared, tmp_path))
            closeness[init] = _cosine(net(*inputs).numpy(), reference).mean()
    assert max(closeness, key=closeness.get) == default, closeness


def test_share_layers_on_a_speech_encoder_exports_and_runs(tmp_path, prepared):
    from services.engine.families.speech import SpeechAdapter
    from services.engine.speech.model import SpeechEncoder

    torch.manual_seed(0)
    encoder = SpeechEncoder(n_speakers=3, d_model=32, layers=4, heads=2, d_ff=64).eval()
    with torch.no_grad():  # like trained weights: no two layers alike (the exporter merges equal constants)
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.1)
    adapter = SpeechAdapter()
    original = export_onnx(encoder, adapter, tmp_path / "original.onnx")
    before = sum(p.numel() for p in encoder.parameters())
    per_layer = sum(p.numel() for p in encoder.layers[0].parameters())
    context = _context(prepared, tmp_path, model_id="speech-ssl", architecture="speech-transformer")
    REGISTRY["share.layers"].apply(encoder, _params("share.layers", group_size=4, init="average"), context)
    assert sum(p.numel() for p in encoder.parameters()) == before - 3 * per_layer
    path = export_onnx(encoder, adapter, tmp_path / "speech.onnx")
    assert _onnx_params(original) - _onnx_params(path) == 3 * per_layer  # one layer stored for four
    features, lengths = adapter.example_inputs()
    digits, speakers = measure.session(path).run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
    with torch.no_grad():
        expected = encoder(features, lengths)
    assert np.allclose(digits, expected[0].numpy(), atol=1e-4) and speakers.shape == (2, 3)


def test_share_layers_refuses_bad_group_sizes(prepared, net, tmp_path):
    context = _context(prepared, tmp_path)
    with pytest.raises(UserError, match="only 6 layers"):
        REGISTRY["share.layers"].apply(net, _params("share.layers", group_size=7), context)
    with pytest.raises(UserError, match="'group_size' must be between 2 and 48"):
        _params("share.layers", group_size=1)
    with pytest.raises(UserError, match="'init' must be one of first, average"):
        _params("share.layers", init="middle")
    REGISTRY["share.layers"].apply(net, _params("share.layers", group_size=6), context)
    with pytest.raises(UserError, match="already shared"):
        REGISTRY["share.layers"].apply(net, _params("share.layers"), context)
    with pytest.raises(UserError, match="no stack of identical layers"):
        REGISTRY["share.layers"].apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), _params("share.layers"), context)


# ---- vocab.trim ------------------------------------------------------------------------------

def test_vocab_trim_run_stores_its_tokenizer_and_shrinks_the_model(prepared):
    store, model, _ = prepared
    recipe = validate_recipe({"steps": [{"method": "vocab.trim"}]}, model, ["pydoc-retrieval"])
    run = pipeline.compress(store, model, recipe, "trim-run", lambda f, m: None)["run"]
    metrics, baseline = run["metrics"], run["baseline"]
    tokenizer_file = store.home / metrics["files"]["tokenizer"]
    assert tokenizer_file.is_file()
    kept = json.loads(tokenizer_file.read_text())["model"]["vocab"]
    rows = max(kept.values()) + 1
    assert 2000 < rows < 5000  # the ~2,600 tokens of the fitting paragraphs and the special tokens
    assert baseline["params"] - metrics["params"] == (30522 - rows) * 384
    assert metrics["size_bytes"] < 0.6 * baseline["size_bytes"]
    assert metrics["fidelity"] > 0.95 and metrics["fidelity_worst"] <= metrics["fidelity"]
    assert abs(metrics["score"] - baseline["score"]) < 0.05
    assert any("fitting texts that are never scored" in note for note in metrics["notes"])
    # The stored model and tokenizer work together outside the job, in ONNX Runtime.
    texts = pydoc_retrieval.fit_paragraphs()[:4]  # counted texts: every token kept, so the output is unchanged
    got = _onnx_outputs(store.resolve(run["artifact"]), texts, tokenizer_file)
    assert _cosine(got, _onnx_outputs(store.resolve(model["artifact"]), texts)).min() > 0.9999


@pytest.mark.parametrize("unseen", ["pieces", "unknown"])
def test_vocab_trim_rebuilds_the_tokenizer_with_working_special_tokens(prepared, net, tmp_path, unseen):
    context = _context(prepared, tmp_path)
    REGISTRY["vocab.trim"].apply(net, _params("vocab.trim", unseen=unseen), context)
    assert context.tokenizer_file == tmp_path / "tokenizer.json"
    rows = net.bert.embeddings.word_embeddings.num_embeddings
    assert net.bert.config.vocab_size == rows < 30522
    tokenizer = minilm.tokenizer(str(context.tokenizer_file))
    encoding = tokenizer.encode("ωμέγα")  # Greek: letters the help paragraphs never use
    assert encoding.ids[0] == tokenizer.token_to_id("[CLS]") and encoding.ids[0] < rows
    assert encoding.ids[-1] == tokenizer.token_to_id("[PAD]") == 0  # what minilm.encode pads with
    words = [t for t in encoding.tokens if t not in ("[CLS]", "[SEP]", "[PAD]")]
    if unseen == "pieces":
        assert words == ["ω", "##μ", "##ε", "##γ", "##α"]  # spelled in single letters, as the original does
    else:
        assert words == ["[UNK]"]
    # A counted paragraph tokenizes to the same tokens as before, under the new ids.
    text = pydoc_retrieval.fit_paragraphs()[0]
    assert tokenizer.encode(text).tokens == minilm.tokenizer().encode(text).tokens


def test_vocab_trim_can_keep_everyday_words_the_counted_texts_missed(prepared, net, tmp_path):
    """keep_frequent keeps the vocabulary's first words (BERT lists them by frequency); extra_text
    counts the standard library's docstrings too: 'ideas' and 'potential', missing from the fitting
    paragraphs, are then read as themselves."""
    from services.engine.methods.vocab_trim import kept_tokens

    spec = json.loads((minilm.package_dir() / "tokenizer.json").read_text())
    texts = pydoc_retrieval.fit_paragraphs()
    plain, _ = kept_tokens(spec, texts, 1, keep_pieces=False)
    frequent, _ = kept_tokens(spec, texts, 1, keep_pieces=False, keep_frequent=5000)
    assert "ideas" not in plain and {"ideas", "potential", "opened"} <= set(frequent)
    assert set(plain) < set(frequent) and len(frequent) < len(plain) + 5000
    assert not any(t.startswith("[unused") for t in frequent)

    context = _context(prepared, tmp_path)
    REGISTRY["vocab.trim"].apply(net, _params("vocab.trim", extra_text=True), context)
    assert net.bert.embeddings.word_embeddings.num_embeddings > len(plain) + 1000
    assert "docstring paragraphs of Python's standard library" in context.notes[0]


def test_vocab_trim_refuses_bad_params_a_second_trim_and_models_without_a_tokenizer(prepared, net, tmp_path):
    with pytest.raises(UserError, match="'min_count' must be between 1 and 1000"):
        _params("vocab.trim", min_count=0)
    with pytest.raises(UserError, match="'unseen' must be one of"):
        _params("vocab.trim", unseen="drop")
    context = _context(prepared, tmp_path)
    REGISTRY["vocab.trim"].apply(net, _params("vocab.trim", min_count=3), context)
    rows = net.bert.embeddings.word_embeddings.num_embeddings
    assert rows < 2600  # fewer than with every used token
    with pytest.raises(UserError, match="already trimmed"):
        REGISTRY["vocab.trim"].apply(net, _params("vocab.trim"), _context(prepared, tmp_path))
    upload = _context(prepared, tmp_path, model_id="my-upload", adapter=object())
    with pytest.raises(UserError, match="has none"):
        REGISTRY["vocab.trim"].apply(copy.deepcopy(prepared[2]), _params("vocab.trim"), upload)


# ---- all three -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["share.embedding", "share.layers", "vocab.trim"])
def test_a_cnn_is_refused_at_validation_naming_the_architecture(method):
    with pytest.raises(UserError, match="this model is a convolutional network"):
        validate_recipe({"steps": [{"method": method}]}, CNN, ["digits"])
