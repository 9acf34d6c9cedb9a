"""Real synthesized speech of English digit words: libespeak-ng (shipped in espeakng-loader)
driven through ctypes, over many voices, rates and pitches, built once into fixed-length banks.

A voice identity is a language voice plus a variant ("en-us+f3", "de+m2"); voices of other
languages read the English words with their own letter rules, i.e. with an accent. The test
split of every bank speaks only with identities that no training clip uses.

espeak keeps state between utterances (pitch flutter phase, gain control, breath noise), so one
clip's samples depend on what the process spoke before it. A bank is therefore synthesized in
fresh worker processes, each speaking a fixed chunk of clips in a fixed order: the bytes are
then the same on every build, whatever else the calling process has spoken.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pathways_mm.errors import ConfigError
from pathways_mm.tasks.corpus import number_words
from pathways_mm.tasks.digits import bank_path, cached_bank, check_split

VERSION = 1
SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050  # what libespeak-ng synthesizes at
ENGLISH_VOICES = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
ACCENT_VOICES = ("de", "nl", "fr", "it", "pt", "sv", "pl", "ro")  # not "es": it spells the w of "two"
VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))
TEST_VOICE_FRACTION = 0.2
PITCHES = (20, 80)  # espeak pitch 0..99, 50 = the voice's own
SILENCE = 100  # |sample| at or below this (of 32767) is not speech when measuring its extent
CHUNK = 256  # clips per worker process; fixed, so the bytes do not depend on the core count
_SALT = 0x5EEC


@dataclass(frozen=True)
class AudioBank:
    """Clips of one split: audio int16 [N, T] at `sample_rate` Hz (one T per bank), texts str [N]
    (the digits spoken, e.g. "3140"), voices str [N] (voice identity, e.g. "de+m2")."""

    audio: np.ndarray
    texts: np.ndarray
    voices: np.ndarray
    sample_rate: int

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, kw_only=True)
class _Recipe:
    name: str
    tag: int  # separates the banks' random streams under one seed
    seconds: float
    sizes: dict[str, int]  # split -> default number of clips
    num_digits: tuple[int, int]  # inclusive range of digits per clip, balanced
    rates: tuple[int, int]  # espeak words per minute


SPOKEN_DIGITS = _Recipe(
    name="spoken_digits", tag=1, seconds=1.0, sizes={"train": 3000, "test": 500}, num_digits=(1, 1), rates=(120, 240)
)
SPOKEN_NUMBERS = _Recipe(
    name="spoken_numbers", tag=2, seconds=2.5, sizes={"train": 3000, "test": 400}, num_digits=(2, 5), rates=(150, 240)
)


def voice_identities() -> tuple[str, ...]:
    return tuple(f"{lang}+{var}" for lang in ENGLISH_VOICES + ACCENT_VOICES for var in VARIANTS)


def split_voices(split: str, seed: int) -> tuple[str, ...]:
    """The voice identities of `split`: a seed-chosen TEST_VOICE_FRACTION of them are test-only."""
    check_split(split)
    ids = voice_identities()
    order = np.random.default_rng([seed, _SALT]).permutation(len(ids))
    num_test = round(len(ids) * TEST_VOICE_FRACTION)
    chosen = order[:num_test] if split == "test" else order[num_test:]
    return tuple(ids[i] for i in sorted(chosen))


@functools.cache
def _espeak_data() -> tuple[Path, Path]:
    import espeakng_loader

    return Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())


@functools.cache
def _known_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(language voice names, variant names) that the shipped espeak data holds, lower case."""
    data = _espeak_data()[1]
    langs = frozenset(p.name.lower() for p in (data / "lang").rglob("*") if p.is_file())
    variants = frozenset(p.name.lower() for p in (data / "voices" / "!v").iterdir())
    return langs, variants


def _check_voice(voice: str) -> None:
    # espeak accepts an unknown variant silently (it speaks the plain voice), so look it up here
    lang, _, variant = voice.lower().partition("+")
    langs, variants = _known_voices()
    if lang not in langs or (variant and variant not in variants):
        raise ConfigError(
            f"espeak has no voice {voice!r}: use '<language>[+<variant>]' with a language file from "
            f"espeak-ng-data/lang (e.g. 'en-us', 'de') and a variant from voices/!v (e.g. 'm3', 'f2')"
        )


class _Espeak:
    """libespeak-ng in synchronous mode: each Synth call hands its samples to a callback."""

    RATE, PITCH = 1, 3  # espeak_PARAMETER
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        lib_path, data_path = _espeak_data()
        lib = ctypes.CDLL(str(lib_path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        # AUDIO_OUTPUT_SYNCHRONOUS; espeakINITIALIZE_DONT_EXIT, or a bad data path kills the process
        rate = lib.espeak_Initialize(2, 0, str(data_path).encode(), 0x8000)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize({data_path}) returned {rate}, expected {ESPEAK_RATE} Hz")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept referenced: espeak calls it later
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._lib = lib
        self._libc = ctypes.CDLL(None)  # espeak draws breath noise from libc rand(), seeded by the time
        self._lock = threading.Lock()  # one engine per process, and it is not reentrant

    def _collect(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        return 0  # 0 = go on synthesizing

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 [samples] at ESPEAK_RATE."""
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ConfigError(f"espeak could not load voice {voice!r}; pick another language voice")
            self._lib.espeak_SetParameter(self.RATE, rate, 0)
            self._lib.espeak_SetParameter(self.PITCH, pitch, 0)
            self._chunks = []
            self._libc.srand(0)  # the same breath noise on every build
            self._lib.espeak_ng_SetRandSeed(0)
            data = text.encode()
            # POS_CHARACTER = 1, espeakCHARS_AUTO = 0
            err = self._lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)
            self._lib.espeak_Synchronize()
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with code {err} on {text!r} ({voice})")
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@functools.cache
def _engine() -> _Espeak:
    return _Espeak()


def _resample(x: np.ndarray) -> np.ndarray:
    """float [n] at ESPEAK_RATE -> float [n * 320/441] at SAMPLE_RATE: band-limit by truncating
    the spectrum (pure numpy FFT, the same bits on every run). Zero-padding to a whole number of
    441-sample blocks keeps the rate ratio exact; the padding is silence."""
    up, down = 320, 441
    n = -(-len(x) // down) * down
    m = n // down * up
    spectrum = np.fft.rfft(x, n)[: m // 2 + 1]
    return np.fft.irfft(spectrum, m) * (m / n)


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
    """`text` spoken by espeak `voice` ("en+f3"), `rate` words/minute, `pitch` 0..99, as int16
    mono at SAMPLE_RATE. espeak's state carries across calls, so a repeat is close, not equal."""
    _check_voice(voice)
    raw = _engine().speak(text, voice, rate, pitch)
    return np.clip(np.rint(_resample(raw.astype(np.float64))), -32768, 32767).astype(np.int16)


def _speech_extent(x: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(x) > SILENCE)
    return (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, 0)


def _render(words: str, voice: str, rate: int, pitch: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """One clip, int16 [window]: the speech (never cut) at a random gain, at a random offset, in
    low-level noise. A string too long for the window is re-spoken faster until it fits."""
    for _ in range(8):
        wave = synthesize(words, voice, rate, pitch).astype(np.float64)
        start, end = _speech_extent(wave)
        if end - start <= window:
            break
        rate = round(rate * 1.15)
    else:
        raise RuntimeError(f"{words!r} ({voice}) does not fit {window} samples even at rate {rate}")
    wave = wave[start:end]
    peak_dbfs = rng.uniform(-18.0, -1.0)
    wave *= 32767 * 10 ** (peak_dbfs / 20) / max(np.abs(wave).max(), 1.0)
    snr_db = rng.uniform(20.0, 40.0)
    noise_std = np.sqrt(np.mean(wave**2)) * 10 ** (-snr_db / 20)
    clip = rng.normal(0.0, noise_std, window)
    offset = int(rng.integers(0, window - len(wave) + 1))
    clip[offset : offset + len(wave)] += wave
    return np.clip(np.rint(clip), -32768, 32767).astype(np.int16)


def _worker_main() -> None:
    """Worker process: JSON {window, jobs: [[words, voice, rate, pitch, rng_key], ...]} on stdin,
    int16 [len(jobs), window] as .npy on stdout."""
    request = json.load(sys.stdin)
    window = request["window"]
    clips = np.stack([_render(w, v, r, p, window, np.random.default_rng(key)) for w, v, r, p, key in request["jobs"]])
    np.save(sys.stdout.buffer, clips, allow_pickle=False)


def _render_in_worker(jobs: list, window: int) -> np.ndarray:
    code = "from pathways_mm.tasks.speech import _worker_main; _worker_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps({"window": window, "jobs": jobs}).encode(), capture_output=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"speech worker failed (exit {proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return np.load(io.BytesIO(proc.stdout), allow_pickle=False)


def _plan(recipe: _Recipe, split: str, seed: int, num_clips: int) -> tuple[list, list[str], list[str]]:
    """What each clip says, who says it, how fast and how high: balanced over digit counts,
    digits and the split's voices; all drawn from (seed, bank, split)."""
    test = int(split == "test")
    rng = np.random.default_rng([seed, _SALT, recipe.tag, test])
    voices = split_voices(split, seed)
    lo, hi = recipe.num_digits
    lengths = rng.permutation(np.resize(np.arange(lo, hi + 1), num_clips))
    firsts = rng.permutation(np.resize(np.arange(10), num_clips))  # every digit leads equally often
    speakers = rng.permutation(np.resize(np.arange(len(voices)), num_clips))
    jobs, texts, who = [], [], []
    for i in range(num_clips):
        digits = [int(firsts[i])] + [int(d) for d in rng.integers(0, 10, lengths[i] - 1)]
        rate, pitch = int(rng.integers(*recipe.rates, endpoint=True)), int(rng.integers(*PITCHES, endpoint=True))
        voice = voices[speakers[i]]
        jobs.append([" ".join(number_words(d) for d in digits), voice, rate, pitch, [seed, _SALT, recipe.tag, test, i]])
        texts.append("".join(map(str, digits)))
        who.append(voice)
    return jobs, texts, who


def _build(recipe: _Recipe, split: str, seed: int, num_clips: int) -> dict[str, np.ndarray]:
    jobs, texts, who = _plan(recipe, split, seed, num_clips)
    for voice in sorted(set(who)):
        _check_voice(voice)
    window = round(recipe.seconds * SAMPLE_RATE)
    audio = np.zeros((num_clips, window), np.int16)
    starts = range(0, num_clips, CHUNK)
    bar = tqdm(total=num_clips, desc=f"{recipe.name} {split}", unit="clip", delay=1.0, file=sys.stderr)
    with bar, ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        futures = {pool.submit(_render_in_worker, jobs[s : s + CHUNK], window): s for s in starts}
        for future in as_completed(futures):
            clips = future.result()
            audio[futures[future] : futures[future] + len(clips)] = clips
            bar.update(len(clips))
    return {"audio": audio, "texts": np.array(texts), "voices": np.array(who)}


def _bank(recipe: _Recipe, split: str, root: Path, seed: int, num_clips: int | None) -> AudioBank:
    check_split(split)
    if num_clips is not None and num_clips < 1:
        raise ConfigError(f"num_clips must be at least 1, got {num_clips}")
    size = recipe.sizes[split] if num_clips is None else num_clips
    path = bank_path(root, recipe.name, split, seed, VERSION, num_clips)
    arrays = cached_bank(path, ("audio", "texts", "voices"), lambda: _build(recipe, split, seed, size))
    return AudioBank(**arrays, sample_rate=SAMPLE_RATE)


def spoken_digits(split: str, root: Path, seed: int, *, num_clips: int | None = None) -> AudioBank:
    """One digit word per 1.0 s clip ("seven"); 3000 train / 500 test clips unless `num_clips`."""
    return _bank(SPOKEN_DIGITS, split, root, seed, num_clips)


def spoken_numbers(split: str, root: Path, seed: int, *, num_clips: int | None = None) -> AudioBank:
    """2-5 digits read one by one per 2.5 s clip ("three one four zero"); 3000 train / 400 test."""
    return _bank(SPOKEN_NUMBERS, split, root, seed, num_clips)
