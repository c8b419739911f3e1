"""Run a .pth checkpoint through the official ChatRWKV ``rwkv`` package (test-only dependency),
in its own process (the package reads its mode from environment variables at import).

usage: python chatrwkv_runner.py MODEL.pth TOKENS.json OUT.npz [v7]
writes: seq = logits of the whole-sequence forward (full_output=True), step = token by token."""
import json
import os
import sys

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
if len(sys.argv) > 4 and sys.argv[4] == "v7":
    os.environ["RWKV_V7_ON"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
from rwkv.model import RWKV  # noqa: E402

path, toks_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
tokens = json.load(open(toks_path))
model = RWKV(model=path[:-4] if path.endswith(".pth") else path, strategy="cpu fp32", **({} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}))
seq, _ = model.forward(list(tokens), None, full_output=True)
state = None
steps = []
for t in tokens:
    o, state = model.forward([t], state)
    steps.append(o.float().numpy().reshape(-1))
np.savez(out, seq=seq.float().numpy().reshape(len(tokens), -1), step=np.stack(steps))
