"""`pathways-mm data example DIR`: a small dataset in every source format, made from the built-in
digit images and espeak speech, and the experiment that declares a task on each.

    DIR/images/*.png, DIR/audio/*.wav, DIR/audio/*.flac   the media files
    DIR/{train,test}.jsonl                                a JSONL manifest of PNG paths
    DIR/{train,test}.csv                                  a CSV manifest of WAV paths
    DIR/shards/{train-000,train-001,test-000}.tar         WebDataset shards: png + flac + txt members
    DIR/hf/                                               a `save_to_disk` DatasetDict (Image, ClassLabel)
    DIR/parquet/{train,test}.parquet                      parquet files (Audio feature, a text question)
    DIR/experiment.yaml                                   declares one task on each
    DIR/deepspeed.json                                    the DeepSpeed settings it names (fp32, AdamW)

It is what the README's "Training on your own data" points at, and what the tests train on.
Shards are written without timestamps and in a fixed order, so a rebuild gives the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
import webdataset as wds
from PIL import Image

from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text
from pathways_mm.tasks.corpus import number_words
from pathways_mm.tasks.digits import digit_images
from pathways_mm.tasks.speech import SAMPLE_RATE, spoken_digits

FILE_RATE = 22_050  # the WAV and FLAC files are at another rate than the model's: training and predict resample
SIZES = {"train": 320, "test": 80}

EXPERIMENT = """\
# Written by `pathways-mm data example`: one declared task per source format, on files next to
# this one (paths in declare: are relative to this file). Train it with
#   pathways-mm train {dir}/experiment.yaml
name: own_data_example
tasks: [seen_digit, heard_digit, same_digit, hf_digit, parquet_sum]
declare:
  seen_digit:  # a JSONL manifest: {{"image": "images/train-0003.png", "word": "seven"}}
    inputs: {{image: image}}
    prompt: which digit?
    target: word
    splits: {{train: {{path: train.jsonl}}, test: {{path: test.jsonl}}}}
  heard_digit:  # a CSV manifest: audio,digit / audio/train-0003.wav,7
    inputs: {{audio: audio}}
    target: digit
    max_new_tokens: 4
    splits: {{train: {{path: train.csv}}, test: {{path: test.csv}}}}
  same_digit:  # WebDataset shards: KEY.png, KEY.flac (22.05 kHz), KEY.txt ("yes"/"no")
    inputs: {{png: image, flac: audio}}
    prompt: same digit?
    target: txt
    max_new_tokens: 4
    splits: {{train: {{path: "shards/train-{{000..001}}.tar"}}, test: {{path: shards/test-000.tar}}}}
  hf_digit:  # a save_to_disk folder: Image feature "image", ClassLabel "label"
    inputs: {{image: image}}
    target: label
    splits: {{train: {{path: hf, split: train}}, test: {{path: hf, split: test}}}}
  parquet_sum:  # parquet files: Audio feature "audio", text "question", text "answer"
    inputs: {{audio: audio, question: text}}
    target: answer
    max_new_tokens: 4
    splits: {{train: {{path: parquet/train.parquet}}, test: {{path: parquet/test.parquet}}}}
model:
  size: debug  # d_model 64, 2 layers; images are read at model.vision.image_size = 16 rows
  moe:  # the sparse model with task pathways (as the demo trains it): 8 experts, 2 per token
    num_experts: 8
    top_k: 2
    expert_d_ff: 96
    balance: global
    mi_coef: 0.05
    mask_mass: 0.95
    mask_step: 1600  # 0.8 x train.steps: then each task keeps the fewest experts carrying 95% of its routes
data:
  max_len: 64
train:
  steps: 2000
  micro_batch_size: 16
  lr: 3.0e-3
  warmup_steps: 50
  log_every: 20
  out_dir: runs/own_data_example  # relative to where you run the command; paths above, to this file
  ds_config: deepspeed.json  # optional; relative to this file; configs/ds/ in the repository has GPU ones
eval:
  max_samples: {test}
"""


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _sound(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _at_file_rate(clip: np.ndarray) -> np.ndarray:
    resampled = AF.resample(torch.from_numpy(clip.astype(np.float32) / 32768), SAMPLE_RATE, FILE_RATE)
    return resampled.clamp(-1, 1).numpy()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _split(out: Path, split: str, n: int, root: Path, seed: int) -> dict[str, list]:
    """Write the split's media files; return its columns (digits, file names, bytes)."""
    images = digit_images(split, root, seed)
    clips = spoken_digits(split, root, seed, num_clips=n)
    rng = np.random.default_rng([seed, n, split == "test"])
    cols: dict[str, list] = {"digit": [], "heard": [], "png": [], "wav": [], "flac": [], "image": [], "audio": []}
    for i in range(n):
        j = int(rng.integers(len(images)))
        clip = _at_file_rate(clips.audio[i])
        png, wav = _png(images.images[j]), _sound(clip, FILE_RATE, "WAV")
        cols["png"].append(png)
        cols["wav"].append(wav)
        cols["flac"].append(_sound(clip, FILE_RATE, "FLAC"))
        cols["digit"].append(int(images.labels[j]))
        cols["heard"].append(int(clips.texts[i]))
        cols["image"].append(f"images/{split}-{i:04d}.png")
        cols["audio"].append(f"audio/{split}-{i:04d}.wav")
        _write(out / "images" / f"{split}-{i:04d}.png", png)
        _write(out / "audio" / f"{split}-{i:04d}.wav", wav)
    return cols


def _manifests(out: Path, split: str, cols: dict[str, list]) -> None:
    lines = [json.dumps({"image": p, "word": number_words(d)}) for p, d in zip(cols["image"], cols["digit"])]
    atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    rows = [f"{p},{d}" for p, d in zip(cols["audio"], cols["heard"])]
    atomic_write_text(out / f"{split}.csv", "audio,digit\n" + "".join(r + "\n" for r in rows))


def _shards(out: Path, split: str, cols: dict[str, list], num_shards: int) -> None:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    n = len(cols["png"])
    for s in range(num_shards):
        with open(out / "shards" / f"{split}-{s:03d}.tar", "wb") as f, wds.TarWriter(f, mtime=0) as sink:
            for i in range(s * n // num_shards, (s + 1) * n // num_shards):
                same = "yes" if cols["digit"][i] == cols["heard"][i] else "no"
                sink.write({"__key__": f"{split}-{i:05d}", "png": cols["png"][i], "flac": cols["flac"][i], "txt": same})


def _hf(out: Path, cols: dict[str, dict[str, list]]) -> None:
    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=[number_words(d) for d in range(10)])
    )
    splits = {}
    for split, c in cols.items():
        images = [{"bytes": b, "path": None} for b in c["png"]]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": c["digit"]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out / "hf"))
    (out / "parquet").mkdir(parents=True, exist_ok=True)
    for split, c in cols.items():
        # Audio features are stored as file bytes; cast after adding them (no audio encoder needed)
        ds = datasets.Dataset.from_dict(
            {
                "audio": [{"bytes": b, "path": None} for b in c["wav"]],
                "question": [f"plus {d}?" for d in c["digit"]],
                "answer": [str(h + d) for h, d in zip(c["heard"], c["digit"])],
            }
        ).cast_column("audio", datasets.Audio())
        ds.to_parquet(str(out / "parquet" / f"{split}.parquet"))


def write_examples(out: Path, root: Path, seed: int = 1234, sizes: dict[str, int] | None = None) -> Path:
    """Write the example datasets and experiment into `out` (media banks built under `root`); returns the
    experiment file. sizes: samples per split, default SIZES (one given split keeps the other's default)."""
    out = Path(out)
    sizes = SIZES | (sizes or {})
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"--{split} {n}: give at least 1 sample per split")
    datasets.disable_progress_bars()
    cols = {}
    for split, n in sizes.items():
        cols[split] = _split(out, split, n, Path(root), seed)
        _manifests(out, split, cols[split])
        _shards(out, split, cols[split], 2 if split == "train" else 1)
    _hf(out, cols)
    path = out / "experiment.yaml"
    atomic_write_text(path, EXPERIMENT.format(dir=out, test=sizes["test"]))
    # micro-batch size, accumulation, lr and weight decay come from the experiment; AdamW by default
    atomic_write_text(out / "deepspeed.json", json.dumps({"gradient_clipping": 1.0}) + "\n")
    return path
