"""eSpeak NG through ctypes, from the library and data that the espeakng-loader package ships.

Pitfalls met and handled here: an unknown voice name returns success and silently speaks the
default voice (refused up front); rate and pitch carry over between voices (set every time);
the callback must stay referenced, gets a NULL buffer at the end and its samples must be copied;
text goes in NUL-terminated; flag 0x8000 keeps a failed start from exiting Python.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

ESPEAK_RATE = 22_050

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # a failure returns an error instead of exiting Python
_POS_CHARACTER = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One initialized eSpeak NG library per process (its state is global)."""

    def __init__(self):
        import espeakng_loader

        data_path = Path(espeakng_loader.get_data_path())
        self.variants = data_path / "voices" / "!v"
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        # The data folder itself ("espeak-ng-data"), not its parent.
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path).encode(), _INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG did not initialize (returned {rate}); data folder {data_path}")
        self.lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._receive)  # keep a reference: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)

    def _receive(self, wav, count, events) -> int:
        if wav and count > 0:  # the last call brings a NULL buffer
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """int16 samples at 22.05 kHz, leading and trailing silence trimmed."""
        variant = voice.split("+", 1)[1] if "+" in voice else None
        if variant and not (self.variants / variant).is_file():
            # eSpeak NG answers success for an unknown name and silently speaks the default voice.
            raise ValueError(f"unknown eSpeak NG voice variant {voice!r}")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG refused the voice {voice!r}")
        # Rate and pitch carry over from one utterance to the next: set them every time.
        self.lib.espeak_SetParameter(_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self.lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
        self._chunks = []
        data = text.encode() + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"eSpeak NG failed on {text!r} with {voice} (status {status})")
        return trim_silence(np.concatenate(self._chunks))


@lru_cache(maxsize=1)
def espeak() -> Espeak:
    return Espeak()


def trim_silence(samples: np.ndarray, threshold: int = 200) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    return samples[loud[0]:loud[-1] + 1] if len(loud) else samples
