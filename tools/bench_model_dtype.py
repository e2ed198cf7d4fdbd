"""The model pass in float32 against bfloat16: tokens/s and how far bf16 activations and gradients
are from fp32 ones, on the embedded SmolLM2-135M (layer 15 residual stream), interleaved runs.

    python tools/bench_model_dtype.py
"""

import time, torch, itertools
from lightning_sae.data import models
from lightning_sae.data.extract import Extractor
from lightning_sae.data.text import pack_contexts, python_docs
tok = models.load_tokenizer()
ctx = torch.stack(list(itertools.islice(pack_contexts(python_docs(), tok, 128), 16)))
m32 = models.load_model(models.EMBEDDED_MODEL, "float32", "cpu"); m16 = models.load_model(models.EMBEDDED_MODEL, "bfloat16", "cpu")
e = {"fp32": Extractor(m32, None, {"x": "layers.15"}), "bf16": Extractor(m16, None, {"x": "layers.15"})}
g = {"fp32": Extractor(m32, None, {"x": "layers.15"}, True), "bf16": Extractor(m16, None, {"x": "layers.15"}, True)}
for ex in list(e.values()) + list(g.values()): ex(ctx[:2])
t = {k: [] for k in ["fp32", "bf16", "fp32g", "bf16g"]}
for r in range(3):
    for k in (["fp32", "bf16"] if r % 2 == 0 else ["bf16", "fp32"]):
        s = time.perf_counter(); out = e[k](ctx); t[k].append(ctx.numel() / (time.perf_counter() - s))
        s = time.perf_counter(); gout = g[k](ctx[:8]); t[k + "g"].append(ctx[:8].numel() / (time.perf_counter() - s))
a32, a16 = e["fp32"](ctx)["x"], e["bf16"](ctx)["x"].float()
g32, g16 = g["fp32"](ctx[:8])["grad"], g["bf16"](ctx[:8])["grad"].float()
def rel(a, b):
    return ((a - b).norm() / a.norm()).item()


import statistics as st
print({k: round(st.median(v)) for k, v in t.items()}, "tok/s")
print("activations rel err %.4f, gradients rel err %.4f" % (rel(a32, a16), rel(g32, g16)))
