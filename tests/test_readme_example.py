"""The README's selector example runs as written: it is the first plugin code a reader copies."""

import re
from pathlib import Path

import torch

from lightning_sae import TopKSAE

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_selector_class() -> type:
    block = re.search(r"```python\n(# my_package/selector.py\n.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its selector example"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace["RandomTieBreakTopK"]


def test_readme_selector_trains_and_records_its_config():
    cls = readme_selector_class()
    sae = TopKSAE(d_in=16, d_sae=64, k=4, seed=0, selector=cls(noise=0.01))
    x = torch.randn(32, 16)
    out = sae(x)
    out.fvu.backward()
    assert out.code.indices.shape == (32, 4) and sae.W_enc.grad is not None
    # The noise only breaks near-ties: the selection stays the top 4 up to 0.01.
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    kth = pre.topk(4, dim=1).values[:, -1:]
    assert (pre.gather(1, out.code.indices) >= kth - 0.01).all()
    config = sae.selector.config()
    assert config["class_path"].endswith("RandomTieBreakTopK") and config["init_args"] == {"noise": 0.01}
