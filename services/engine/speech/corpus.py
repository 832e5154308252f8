"""The speech corpus: digit strings and words spoken by 12 eSpeak NG voices, with noise, as log-mel frames.

Everything random (strings, voices, rates, pitches, noise) is drawn up front from one seed
(`plan_corpus`), then synthesized in that order. eSpeak NG itself is not deterministic: the same
text and voice come out a few samples longer or shorter from one call to the next, in one
process or in two fresh ones alike (espeak_ng_SetRandSeed does not change that). So the corpus
is generated once and cached as a file under the artifact store; every later reader (training,
scoring, tests) gets the very same arrays from that file.

Each utterance is kept twice, as the log-mel of the noisy audio (what the model hears) and of
the same audio without its noise (what masked-frame pretraining reconstructs; no labels).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from services.engine.speech.espeak import ESPEAK_RATE, Espeak, espeak
from services.engine.speech.features import HOP, LOG_FLOOR, N_FFT, N_MELS, SAMPLE_RATE, WINDOW, log_mels

CORPUS_SEED = 2024
CLEAN_FLOOR = -10.0  # the noise-free frames' log-mel is clipped here: digital silence would be -13.8
MAX_FRAMES = 160  # 3.2 s: the fixed input length of the exported model; every utterance fits

VOICES = ("en+m1", "en+m2", "en+m3", "en+m4", "en+m5", "en+m6", "en+m7",
          "en+f1", "en+f2", "en+f3", "en+f4", "en+f5")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words for speaker-id variety; none sounds like a digit.
WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go", "hello", "thanks", "red", "green",
         "blue", "yellow", "house", "water", "river", "mountain", "coffee", "window", "garden", "music",
         "paper", "summer", "winter", "morning", "evening", "today", "tomorrow", "yesterday", "apple",
         "orange", "banana", "table", "chair", "doctor", "teacher", "computer", "happy", "quickly",
         "slowly", "forward", "backward", "open", "close", "north", "south", "bridge")

TRAIN_DIGIT_UTTERANCES = 2400
TEST_DIGIT_UTTERANCES = 600
WORD_UTTERANCES_PER_VOICE = {"train": 50, "test": 20}
TEST_WORDS_PER_VOICE = 12  # words each voice says only in the test split
DIGITS_PER_STRING = (3, 6)
RATE_WPM = (170, 260)
PITCH = (25, 75)  # eSpeak's 0-100 pitch parameter, on top of each voice's own base pitch
PITCH_RANGE = (30, 70)
SNR_DB = (0.0, 20.0)
GAIN_DB = (-6.0, 6.0)
LEAD_SILENCE_S = (0.05, 0.3)
TRAIL_SILENCE_S = (0.05, 0.2)

SPLITS = ("train", "test")
KINDS = ("digits", "words")
CONFIG = {
    "version": 2, "seed": CORPUS_SEED, "sample_rate": SAMPLE_RATE, "hop": HOP, "window": WINDOW, "n_fft": N_FFT,
    "n_mels": N_MELS, "voices": VOICES, "words": WORDS, "train_digits": TRAIN_DIGIT_UTTERANCES,
    "test_digits": TEST_DIGIT_UTTERANCES, "word_utterances": WORD_UTTERANCES_PER_VOICE,
    "test_words": TEST_WORDS_PER_VOICE, "rate": RATE_WPM, "pitch": PITCH, "range": PITCH_RANGE, "snr": SNR_DB,
    "gain": GAIN_DB, "lead": LEAD_SILENCE_S, "trail": TRAIL_SILENCE_S, "max_frames": MAX_FRAMES,
    "log_floor": LOG_FLOOR, "clean_floor": CLEAN_FLOOR,
}
CONFIG_KEY = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:12]

Progress = Callable[[float, str], None]


# ---- voices ------------------------------------------------------------------------------------

def voice_distances(text: str = "one two three four five") -> np.ndarray:
    """(voices, voices) distances between the mean log-mel of one text spoken by each voice.

    A voice name eSpeak NG does not know falls back to the default voice without an error;
    two voices whose distance is near zero would be one speaker under two labels.
    Repeating the same voice gives about 0.7 (eSpeak's own jitter); distinct voices 3 or more.
    """
    from scipy.signal import resample_poly

    engine = espeak()
    waves = [resample_poly(engine.synthesize(text, voice, 200, 50, 50).astype(np.float32) / 32768.0,
                           SAMPLE_RATE // 50, ESPEAK_RATE // 50) for voice in VOICES]
    profiles = np.stack([m.mean(axis=0) for m in log_mels(waves)])
    return np.linalg.norm(profiles[:, None, :] - profiles[None, :, :], axis=-1)


def check_voices_differ(minimum: float = 1.5) -> None:
    distances = voice_distances() + np.eye(len(VOICES)) * 1e9
    a, b = np.unravel_index(np.argmin(distances), distances.shape)
    if distances[a, b] < minimum:
        raise RuntimeError(f"eSpeak NG voices {VOICES[a]} and {VOICES[b]} sound the same "
                           f"(distance {distances[a, b]:.2f}); is a voice variant missing?")


# ---- the plan: every random choice, drawn before any synthesis ---------------------------------

def _digit_strings(rng: np.random.Generator, count: int, refuse: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        length = int(rng.integers(DIGITS_PER_STRING[0], DIGITS_PER_STRING[1] + 1))
        string = "".join(str(d) for d in rng.integers(0, 10, size=length))
        if string not in refuse:
            out.append(string)
    return out


def plan_corpus(seed: int = CORPUS_SEED) -> list[dict]:
    """One dict per utterance: text, labels and every synthesis and noise setting."""
    rng = np.random.default_rng(seed)
    train_strings = _digit_strings(rng, TRAIN_DIGIT_UTTERANCES, set())
    # Test strings are never heard in training, from any voice; each appears once.
    test_strings: list[str] = []
    seen = set(train_strings)
    for string in _digit_strings(rng, TEST_DIGIT_UTTERANCES * 3, seen):
        if string not in seen:
            seen.add(string)
            test_strings.append(string)
        if len(test_strings) == TEST_DIGIT_UTTERANCES:
            break
    items = ([("train", "digits", s, None) for s in train_strings]
             + [("test", "digits", s, None) for s in test_strings])
    digit_voices = rng.integers(0, len(VOICES), size=len(items))
    items = [(split, kind, s, int(v)) for (split, kind, s, _), v in zip(items, digit_voices)]
    # Words: each voice says some words only in the test split, so speaker-id is scored on words
    # the speaker head never heard from that voice.
    for voice in range(len(VOICES)):
        order = rng.permutation(len(WORDS))
        vocab = {"train": order[TEST_WORDS_PER_VOICE:], "test": order[:TEST_WORDS_PER_VOICE]}
        for split in SPLITS:
            for _ in range(WORD_UTTERANCES_PER_VOICE[split]):
                chosen = rng.choice(vocab[split], size=int(rng.integers(1, 4)), replace=False)
                items.append((split, "words", " ".join(WORDS[i] for i in chosen), voice))
    plan = []
    for split, kind, content, voice in items:
        plan.append({
            "split": split, "kind": kind, "voice": voice,
            "digits": content if kind == "digits" else "",
            "text": " ".join(DIGIT_WORDS[int(d)] for d in content) if kind == "digits" else content,
            "rate": int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
            "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1)),
            "range": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
            "snr_db": float(rng.uniform(*SNR_DB)),
            "gain_db": float(rng.uniform(*GAIN_DB)),
            "lead_s": float(rng.uniform(*LEAD_SILENCE_S)),
            "trail_s": float(rng.uniform(*TRAIL_SILENCE_S)),
            "noise_tilt": float(rng.uniform(0.0, 0.95)),
            "noise_seed": int(rng.integers(0, 2**31 - 1)),
        })
    return plan


def mix_noise(speech: np.ndarray, item: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pad with silence, add coloured noise at the item's SNR and apply its gain (float32, 16 kHz).

    Returns the noisy waveform and the same waveform without its noise."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(item["noise_seed"])
    lead, trail = int(item["lead_s"] * SAMPLE_RATE), int(item["trail_s"] * SAMPLE_RATE)
    padded = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    # White noise through a one-pole low-pass: from hiss (tilt 0) to rumble (tilt near 1).
    noise = lfilter([1.0], [1.0, -item["noise_tilt"]], rng.standard_normal(len(padded))).astype(np.float32)
    speech_power = float(np.mean(speech.astype(np.float64) ** 2)) + 1e-12
    noise_power = float(np.mean(noise.astype(np.float64) ** 2)) + 1e-12
    noise *= np.sqrt(speech_power / noise_power / 10.0 ** (item["snr_db"] / 10.0))
    gain = 10.0 ** (item["gain_db"] / 20.0)
    return ((padded + noise) * gain).astype(np.float32), (padded * gain).astype(np.float32)


def render(item: dict, engine: Espeak | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One planned utterance as a noisy 16 kHz waveform, and the same without the noise."""
    from scipy.signal import resample_poly

    engine = engine or espeak()
    raw = engine.synthesize(item["text"], VOICES[item["voice"]], item["rate"], item["pitch"], item["range"])
    speech = resample_poly(raw.astype(np.float32) / 32768.0, SAMPLE_RATE // 50, ESPEAK_RATE // 50)
    return mix_noise(speech.astype(np.float32), item)


# ---- the corpus ----------------------------------------------------------------------------------

@dataclass
class SpeechCorpus:
    features: np.ndarray  # (total frames, 80) float16, utterances one after another
    offsets: np.ndarray  # (N + 1,) int64: utterance i is features[offsets[i]:offsets[i + 1]]
    voice: np.ndarray  # (N,) int64 speaker index into VOICES
    split: np.ndarray  # (N,) str: 'train' | 'test'
    kind: np.ndarray  # (N,) str: 'digits' | 'words'
    digits: np.ndarray  # (N,) str: the digit string ('' for words)
    text: np.ndarray  # (N,) str: what was spoken
    clean: np.ndarray | None = None  # like `features`, of the speech without its noise (pretraining targets)
    generate_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.voice)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def frames(self, index: int, clean: bool = False) -> np.ndarray:
        source = self.clean if clean else self.features
        return source[self.offsets[index]:self.offsets[index + 1]].astype(np.float32)

    def select(self, split: str, kind: str | None = None) -> np.ndarray:
        keep = self.split == split
        if kind is not None:
            keep &= self.kind == kind
        return np.flatnonzero(keep)

    def padded(self, indices, frames: int = MAX_FRAMES, clean: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(len(indices), frames, 80) float32 zero-padded log-mel and the (len(indices),) int64 lengths."""
        indices = np.asarray(indices)
        lengths = self.lengths[indices]
        if lengths.max(initial=0) > frames:
            raise ValueError(f"an utterance has {lengths.max()} frames, more than {frames}")
        out = np.zeros((len(indices), frames, N_MELS), np.float32)
        for row, index in enumerate(indices):
            out[row, :lengths[row]] = self.frames(index, clean)
        return out, lengths.astype(np.int64)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, features=self.features, clean=self.clean, offsets=self.offsets, voice=self.voice, split=self.split,
                 kind=self.kind, digits=self.digits, text=self.text,
                 generate_seconds=np.float64(self.generate_seconds), config=np.str_(json.dumps(CONFIG)))
        return buffer.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> "SpeechCorpus":
        with np.load(path, allow_pickle=False) as data:
            return cls(features=data["features"], clean=data["clean"], offsets=data["offsets"], voice=data["voice"],
                       split=data["split"], kind=data["kind"], digits=data["digits"], text=data["text"],
                       generate_seconds=float(data["generate_seconds"]))


def generate_corpus(progress: Progress | None = None) -> SpeechCorpus:
    """Synthesize the planned corpus (about 10 s on 2 cores). Call `load_corpus` instead: it caches."""
    started = time.perf_counter()
    plan = plan_corpus()
    check_voices_differ()
    engine = espeak()
    chunks, clean_chunks, lengths = [], [], []
    step = 256
    for start in range(0, len(plan), step):
        pairs = [render(item, engine) for item in plan[start:start + step]]
        mels = log_mels([noisy for noisy, _ in pairs] + [clean for _, clean in pairs])
        clean_chunks.extend(np.maximum(m, CLEAN_FLOOR).astype(np.float16) for m in mels[len(pairs):])
        for index, features in enumerate(mels[:len(pairs)], start):
            if len(features) > MAX_FRAMES:
                raise RuntimeError(f"utterance {index} ({plan[index]['text']!r}) has {len(features)} frames, "
                                   f"more than the model's {MAX_FRAMES}")
            chunks.append(features.astype(np.float16))
            lengths.append(len(features))
        if progress:
            done = min(start + step, len(plan))
            progress(done / len(plan), f"synthesized {done}/{len(plan)} utterances")
    return SpeechCorpus(
        features=np.concatenate(chunks), clean=np.concatenate(clean_chunks), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        voice=np.array([p["voice"] for p in plan], np.int64), split=np.array([p["split"] for p in plan]),
        kind=np.array([p["kind"] for p in plan]), digits=np.array([p["digits"] for p in plan]),
        text=np.array([p["text"] for p in plan]), generate_seconds=time.perf_counter() - started)


def cache_path(home: Path | str | None = None) -> Path:
    from storage import ArtifactStore, explorer_home

    store = ArtifactStore(home or explorer_home())
    return store.path("cache", "speech", f"corpus-{CONFIG_KEY}.npz")


def load_corpus(progress: Progress | None = None, home: Path | str | None = None) -> SpeechCorpus:
    """The corpus from its cache file under EXPLORER_HOME, generated and written (atomically) on first use."""
    path = cache_path(home)
    if not path.is_file():
        corpus = generate_corpus(progress)
        from storage import ArtifactStore, explorer_home

        store = ArtifactStore(home or explorer_home())
        store.write_bytes(corpus.to_bytes(), *path.relative_to(store.root).parts)
    return _read_cached(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=2)
def _read_cached(path: str, mtime_ns: int) -> SpeechCorpus:
    return SpeechCorpus.from_file(Path(path))
