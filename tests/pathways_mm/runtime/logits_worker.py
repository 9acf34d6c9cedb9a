"""Float32 logits of a checkpoint on a fixed synthetic batch, on CUDA if this process sees a GPU, else on the CPU.

    python -m tests.pathways_mm.runtime.logits_worker CKPT OUT.pt

Loads the way every one-process tool does (open_checkpoint, every expert in this process).
"""

from __future__ import annotations

import sys

import torch

from pathways_mm.bench.common import synthetic_batch
from pathways_mm.config import one_process
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.model.batch import IGNORE
from pathways_mm.model.model import build_model
from pathways_mm.runtime import checkpoint as ckpt


def main() -> None:
    source, out = sys.argv[1:3]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 on both devices
    tok = load_tokenizer()
    tag_dir, _, cfg = ckpt.open_checkpoint(source, tok)
    model = build_model(one_process(cfg).model, tok.vocab_size)
    state = ckpt.load_full_state(tag_dir)
    ckpt.load_weights(model, state, tag_dir)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).float().eval()
    batch = synthetic_batch(2, 48, tok.vocab_size, 2, dev, min_len=48)
    with torch.no_grad():
        logits = model(batch, batch.labels != IGNORE).logits
    dtypes = sorted({str(v.dtype) for v in state.values() if torch.is_floating_point(v)})
    torch.save({"logits": logits.cpu(), "device": dev.type, "stored_dtypes": dtypes}, out)


if __name__ == "__main__":
    main()
