"""minilm-l6: the real all-MiniLM-L6-v2 from its package, the pydoc-retrieval task, and compression
of it measured end to end. One prepared model is shared by the module (preparing takes ~15 s)."""
from __future__ import annotations

import numpy as np
import pytest

from services.engine import export, measure, pipeline, tasks
from services.engine.families import minilm
from services.engine.tasks import pydoc_retrieval
from services.recipes import validate_recipe
from storage import ArtifactStore

pytestmark = pytest.mark.slow

MODEL = {"id": "minilm-l6", "format": "torch", "task": "pydoc-retrieval", "status": "new", "artifact": None}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    home = tmp_path_factory.mktemp("minilm-home")
    store = ArtifactStore(home)
    result = pipeline.prepare(store, MODEL, lambda fraction, message: None)
    return store, {**MODEL, **result["model_update"]}


def test_the_exported_encoder_gives_sentence_transformers_embeddings(prepared):
    from sentence_transformers import SentenceTransformer

    store, model = prepared
    texts = ["Compression makes models smaller.", "The quick brown fox jumps over the lazy dog.",
             "for statement: iterates over the elements of a sequence"]
    expected = SentenceTransformer(str(minilm.package_dir()), device="cpu").encode(texts)
    sess = measure.session(store.resolve(model["artifact"]))
    got = sess.run(None, minilm.encode(texts))[0]
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert got.shape == (3, 384)
    assert cosine.min() > 0.9999


def test_pydoc_pairs_are_fixed_and_neighbours_of_one_topic():
    pairs = pydoc_retrieval.pairs()
    assert len(pairs) > 1000 and len(pydoc_retrieval.test_pairs()) == 256
    assert pydoc_retrieval.test_pairs() == pydoc_retrieval.test_pairs()
    topic, first, second = pairs[0]
    from pydoc_data.topics import topics

    text = " ".join(topics[topic].split())
    assert first[:60] in text and second[:60] in text and text.index(first[:60]) < text.index(second[:60])


def test_the_card_reports_real_retrieval_scores(prepared):
    card = prepared[1]["card"]
    assert card["score_name"] == "recall@1"
    # measured: recall@1 0.18, MRR 0.31 on 256 candidates; far above chance (1/256)
    assert 0.08 < card["score"] < 0.5 and card["mrr"] > card["score"]
    assert card["fidelity"] == pytest.approx(1.0)
    assert card["params"] == 22_565_376 and card["params_by_op"]["Gather"] == 30522 * 384 + 512 * 384 + 2 * 384
    assert card["batch_latency_ms"]["batch"] == 32
    assert [i["name"] for i in card["io"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]


def test_pruning_then_quantizing_minilm_is_measured_against_the_original(prepared, tmp_path):
    store, model = prepared
    recipe = validate_recipe({"steps": [{"method": "prune.magnitude", "params": {"amount": 0.3}},
                                        {"method": "quantize.dynamic"}]}, model, ["pydoc-retrieval", "fidelity"])
    run = pipeline.compress(store, model, recipe, "minilm-run", lambda fraction, message: None)["run"]
    metrics, baseline = run["metrics"], run["baseline"]
    # int8 weights for the MatMuls and the embedding table: about 4x smaller
    assert metrics["size_bytes"] < 0.3 * baseline["size_bytes"]
    assert metrics["nonzero_params"] < 0.85 * baseline["nonzero_params"]
    assert metrics["fidelity"] > 0.9 and metrics["fidelity_worst"] <= metrics["fidelity"]
    assert abs(metrics["score"] - baseline["score"]) < 0.1
    assert metrics["score_name"] == "recall@1" and "mrr" in metrics


def test_fidelity_task_scores_cosine_against_the_original(prepared):
    store, model = prepared
    evaluation = tasks.eval_set("fidelity", "minilm-l6")
    outputs = measure.run_outputs(measure.session(store.resolve(model["artifact"])), evaluation)
    noisy = outputs + np.random.default_rng(0).normal(0, 0.02, outputs.shape).astype(np.float32)
    scored = tasks.score("fidelity", "minilm-l6", "embedding", evaluation, noisy, outputs)
    assert scored["score_name"] == "fidelity" and 0.8 < scored["score"] < 1.0


def test_sequence_pool_merges_tokens_at_any_rate_and_the_export_runs_on_fewer(prepared, tmp_path):
    """Token merging needs no training: each rate is one short job; the later layers see fewer tokens,
    the embedding stays close, and ONNX Runtime runs the merged graph faster side by side."""
    store, model = prepared
    recipe = validate_recipe({"task": "fidelity", "steps": [{"method": "sequence.pool", "params": {"rate": 2.5}}]},
                             model, ["pydoc-retrieval", "fidelity"])
    run = pipeline.compress(store, model, recipe, "minilm-merge", lambda fraction, message: None)["run"]
    metrics = run["metrics"]
    assert metrics["pooling_rate"] == 2.5 and metrics["params"] == run["baseline"]["params"]
    assert metrics["fidelity"] > 0.95  # measured: 0.990 at rate 2, 0.944 at rate 4
    assert "64, 54, 45, 37, 31, 26 of the 64 token positions" in metrics["notes"][0]

    net = pipeline._load_torch_model(store, "minilm-l6")
    seen = []
    net.bert.encoder.layer[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    feed = minilm.encode(["a sentence long enough to have something to merge " * 8])
    inputs = tuple(__import__("torch").from_numpy(feed[name]) for name in minilm.MiniLMAdapter.input_names)
    paths, last_layer_tokens = [], []
    for rate in (1.0, 4.0):
        net.merge_rate = rate
        seen.clear()
        net(*inputs)
        last_layer_tokens.append(seen[0])
        paths.append(export.export_onnx(net, minilm.MiniLMAdapter(), tmp_path / f"rate-{rate}.onnx"))
    assert last_layer_tokens == [64, 16]
    evaluation = tasks.eval_set("fidelity", "minilm-l6")
    full, merged = measure.measure_latency(paths, evaluation, seconds=2.0)
    assert merged["batch_latency_ms"]["p50"] < 0.85 * full["batch_latency_ms"]["p50"]  # measured: 0.62


def test_sequence_pool_on_text_refuses_to_learn_the_rate(prepared):
    from services.errors import UserError

    with pytest.raises(UserError, match="learning the rate is built for the speech encoder"):
        validate_recipe({"task": "pydoc-retrieval", "steps": [{"method": "sequence.pool",
                                                               "params": {"learn_rate": True}}]},
                        prepared[1], ["pydoc-retrieval", "fidelity"])
