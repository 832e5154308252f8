"""Momentum-contrast pretraining of the speech encoder (speech-ssl-moco) and the share of unlabeled audio.

Everything here runs on a small synthetic corpus (random "speech" frames plus noise, no eSpeak NG) and
a few steps: what is tested is the mechanics (no labels read, the momentum encoder, the subset), not
what pretraining buys; bench/ssl_data.py measures that on the real corpus.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from services import catalog
from services.engine import moco, zoo
from services.engine.families.speech import SpeechAdapter, SpeechMocoAdapter
from services.engine.speech import moco_pretrain, train
from services.engine.speech.corpus import N_MELS, SpeechCorpus
from services.engine.speech.model import SpeechEncoder


def _corpus(train_count: int = 40, test_count: int = 4, seed: int = 0) -> SpeechCorpus:
    """Utterances of 24-48 frames: a smooth random pattern per utterance ("clean"), plus noise."""
    rng = np.random.default_rng(seed)
    count = train_count + test_count
    lengths = rng.integers(24, 49, count)
    clean = [np.cumsum(rng.normal(0, 0.5, (n, N_MELS)), axis=0) * 0.3 - 5 for n in lengths]
    noisy = [c + rng.normal(0, 0.3, c.shape) for c in clean]
    digits = np.array(["".join(map(str, rng.integers(0, 10, 3))) for _ in range(count)])
    return SpeechCorpus(features=np.concatenate(noisy).astype(np.float16),
                        clean=np.concatenate(clean).astype(np.float16),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        voice=rng.integers(0, 12, count), split=np.array(["train"] * train_count + ["test"] * test_count),
                        kind=np.array(["digits"] * count), digits=digits, text=digits)


def _model(data: train.TrainingSet) -> SpeechEncoder:
    torch.manual_seed(0)
    model = SpeechEncoder(n_speakers=12, d_model=32, layers=2, heads=2, d_ff=64)
    mean, std = data.feature_stats()
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_momentum_contrast_lowers_its_loss_and_never_reads_a_label():
    corpus = _corpus()
    data = train.TrainingSet(corpus, seed=0)
    garbled = copy.deepcopy(data)  # same audio, same batch draws; every label replaced by nonsense
    garbled.voice = torch.randint(0, 12, garbled.voice.shape)
    garbled.is_digits = ~garbled.is_digits
    garbled.targets = [torch.randint(1, 11, (7,)) for _ in garbled.targets]

    model, twin = _model(data), _model(data)
    losses = moco_pretrain.pretrain_momentum_contrast(model, data, steps=60, lr=2e-3, queue_size=256)
    assert moco_pretrain.pretrain_momentum_contrast(twin, garbled, steps=60, lr=2e-3, queue_size=256) == losses
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    # The queue is full after a few steps (each batch holds over 100 blocks): compare from there on.
    assert np.mean(losses[-10:]) < np.mean(losses[5:15]) - 0.3


def test_the_momentum_encoder_moves_by_its_moving_average_only(monkeypatch):
    corpus = _corpus()
    data = train.TrainingSet(corpus, seed=0)
    copies, updates = [], []
    real_copy, real_update = moco.momentum_copy, moco.momentum_update

    def recording_copy(module):
        twin = real_copy(module)
        copies.append(twin)
        return twin

    def recording_update(key_encoder, query_encoder, momentum=moco.MOMENTUM):
        before = [p.clone() for p in key_encoder.parameters()]
        real_update(key_encoder, query_encoder, momentum)
        updates.append((key_encoder, before, [p.clone() for p in query_encoder.parameters()],
                        [p.clone() for p in key_encoder.parameters()]))

    monkeypatch.setattr(moco, "momentum_copy", recording_copy)
    monkeypatch.setattr(moco, "momentum_update", recording_update)
    model = _model(data)
    moco_pretrain.pretrain_momentum_contrast(model, data, steps=4, queue_size=256)
    key_encoder = copies[0]
    assert isinstance(key_encoder, SpeechEncoder) and key_encoder is not model
    assert all(not p.requires_grad and p.grad is None for p in key_encoder.parameters())
    mine = [u for u in updates if u[0] is key_encoder]
    assert len(mine) == 4
    for before, query, after in (u[1:] for u in mine):  # key <- m key + (1 - m) query, nothing else
        for b, q, a in zip(before, query, after):
            torch.testing.assert_close(a, moco.MOMENTUM * b + (1 - moco.MOMENTUM) * q)
    for (_, _, _, after), (_, before, _, _) in zip(mine, mine[1:]):  # untouched between two updates
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    final = [u[3] for u in mine][-1]
    assert all(torch.equal(p, f) for p, f in zip(key_encoder.parameters(), final))
    assert not all(torch.equal(p, q) for p, q in zip(key_encoder.parameters(), model.parameters()))


def test_pretrain_share_keeps_a_fixed_part_of_the_training_audio(monkeypatch):
    corpus = _corpus(train_count=40)
    part = train.TrainingSet(corpus, seed=3, share=0.25)
    assert len(part) == 10 and len(set(part.indices.tolist())) == 10
    assert set(part.indices.tolist()) <= set(corpus.select("train").tolist())
    assert np.array_equal(part.indices, train.TrainingSet(corpus, seed=3, share=0.25).indices)  # seeded: fixed
    drawn = {int(part.indices[r]) for _ in range(20) for r in part.batch()["rows"].tolist()}
    assert drawn == set(part.indices.tolist())  # batches come from the part only, all of it

    seen = {}
    monkeypatch.setattr(moco_pretrain, "pretrain_momentum_contrast",
                        lambda model, data, *a, **k: seen.setdefault("pretrain", set(data.indices.tolist())))
    monkeypatch.setattr(train, "finetune", lambda model, data, *a, **k: seen.setdefault("finetune", len(data)))
    schedule = train.Schedule(pretrain_steps=2, finetune_steps=2, pretrain_objective="momentum-contrast",
                              pretrain_share=0.25)
    train.train_speech_ssl(corpus, schedule, seed=3, model=_model(train.TrainingSet(corpus)))
    assert seen == {"pretrain": set(part.indices.tolist()), "finetune": 40}  # fine-tuning: the whole split


def test_the_default_schedule_still_pretrains_masked_on_all_the_audio(monkeypatch):
    assert train.Schedule().pretrain_objective == "masked" and train.Schedule().pretrain_share == 1.0
    calls = []
    monkeypatch.setattr(train, "pretrain", lambda model, data, *a, **k: calls.append(("masked", len(data))))
    monkeypatch.setattr(moco_pretrain, "pretrain_momentum_contrast", lambda model, data, *a, **k: calls.append(("moco",)))
    monkeypatch.setattr(train, "finetune", lambda *a, **k: None)
    corpus = _corpus()
    train.train_speech_ssl(corpus, train.Schedule(pretrain_steps=2, finetune_steps=2),
                           model=_model(train.TrainingSet(corpus)))
    assert calls == [("masked", 40)]
    with pytest.raises(ValueError, match="unknown pretraining objective"):
        train.train_speech_ssl(corpus, train.Schedule(pretrain_objective="contrastive"))


def test_speech_ssl_moco_is_a_second_built_in_speech_model(monkeypatch):
    assert SpeechAdapter().schedule.pretrain_objective == "masked"
    adapter = zoo.get_adapter("speech-ssl-moco")
    assert isinstance(adapter, SpeechMocoAdapter) and adapter.schedule.pretrain_objective == "momentum-contrast"
    assert zoo.get_adapter("speech-ssl").schedule == train.Schedule()  # speech-ssl itself is unchanged
    spec = catalog.BUILTIN_MODELS["speech-ssl-moco"]
    assert spec["architecture"] == "speech-transformer" and spec["task"] == "spoken-digits"
    assert catalog.MODEL_TASKS["speech-ssl-moco"] == catalog.MODEL_TASKS["speech-ssl"]

    # create() trains with momentum contrast (on the synthetic corpus, two steps of each phase)
    from services.engine.families import speech as family

    objectives = []
    monkeypatch.setattr(family, "load_corpus", lambda progress=None: _corpus())
    monkeypatch.setattr(family, "train_speech_ssl", lambda corpus, schedule, *a, **k: objectives.append(
        schedule.pretrain_objective) or SpeechEncoder())
    adapter.create(lambda fraction, message: None)
    SpeechAdapter().create(lambda fraction, message: None)
    assert objectives == ["momentum-contrast", "masked"]
