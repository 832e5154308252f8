"""A WAV data set's recordings as a model's audio input: 16 kHz waveforms padded or cut to the input's
length, or the project's log-mel features (speech/features.py) for a (frames, 80) input."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from services import data_fit
from services.engine.tasks.base import NUMPY_TYPES
from services.errors import UserError

AUDIO_RATE = 16_000


def read_wav_16k(path: Path) -> np.ndarray:
    """A stored recording (16 kHz mono 16-bit PCM, as services/wav_zip.py writes it) as floats in [-1, 1)."""
    try:
        with wave.open(str(path)) as handle:
            layout = (handle.getframerate(), handle.getnchannels(), handle.getsampwidth())
            raw = handle.readframes(handle.getnframes())
    except (OSError, wave.Error, EOFError):
        raise UserError(f"The recording {path.name} of the data set cannot be read; import the data set again.") \
            from None
    if layout != (AUDIO_RATE, 1, 2):
        raise UserError(f"The recording {path.name} of the data set is not 16 kHz mono 16-bit; import the data set "
                        f"again.")
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def fit_length(waveform: np.ndarray, samples: int) -> np.ndarray:
    """The first `samples` samples; a shorter recording is followed by silence."""
    out = np.zeros(samples, np.float32)
    out[:min(samples, len(waveform))] = waveform[:samples]
    return out


def audio_inputs(paths: list[Path], input_name: str, spec: dict, dataset_name: str) -> tuple[np.ndarray, str]:
    """The recordings as the model's audio input: waveforms (batch, samples), padded with silence or cut
    to the input's length, or log-mel frames (batch, frames, 80) from speech/features.py, decided from
    the input's shape (data_fit.audio_input_layout)."""
    layout = data_fit.audio_input_layout(input_name, spec, dataset_name)
    dtype = NUMPY_TYPES[spec["dtype"]]
    shape = (len(paths), *spec["sample_shape"])
    if layout["kind"] == "waveform":
        samples = layout["samples"]
        x = np.stack([fit_length(read_wav_16k(p), samples) for p in paths]).reshape(shape)
        return x.astype(dtype), (f"16 kHz waveforms of {samples:,} samples ({samples / AUDIO_RATE:.2f} s; longer "
                                 f"recordings are cut, shorter ones padded with silence)")
    from services.engine.speech import features

    frames = layout["frames"]
    # (frames - 1) hops of audio give exactly `frames` centred frames
    samples = (frames - 1) * features.HOP
    mels = []
    for start in range(0, len(paths), 128):  # one batched FFT per 128 recordings keeps memory small
        chunk = [fit_length(read_wav_16k(p), samples) for p in paths[start:start + 128]]
        mels.extend(features.log_mels(chunk))
    x = np.stack(mels)
    if layout["mel_first"]:
        x = x.transpose(0, 2, 1)
    hop_ms = 1000 * features.HOP // features.SAMPLE_RATE
    return x.reshape(shape).astype(dtype), (f"log-mel features ({features.N_MELS} bands, one frame every {hop_ms} "
                                            f"ms) of the first {frames} frames ({samples / AUDIO_RATE:.2f} s; "
                                            f"shorter recordings padded with silence)")
