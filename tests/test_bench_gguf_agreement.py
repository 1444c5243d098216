"""llama.cpp's activation rounding as bench/bench_gguf_agreement.py and `act_quant: llamacpp`
use it (quantize.act_llamacpp), on batched inputs of the default model's widths, against a
numpy loop over blocks (the bench's smoke run on a phase output is in test_bitnet_gguf.py,
where llama.cpp is installed)."""

import numpy as np
import pytest
import torch

from agent_forge.bitnet.quantize import act_llamacpp


def slow_blocks(row: np.ndarray, block: int) -> np.ndarray:
    """One row, block by block, as llama.cpp's reference quantisers write it: d = amax / 127,
    q = round(x / d); the value q * d, where Q8_0 stores that d in fp16 (after rounding q)."""
    out = np.zeros_like(row)
    for start in range(0, len(row), block):
        x = row[start:start + block]
        d = np.float32(np.abs(x).max() / np.float32(127))
        stored = np.float32(np.float16(d)) if block == 32 else d
        out[start:start + block] = 0 if d == 0 else np.round(x / d) * stored
    return out


@pytest.mark.parametrize("width,block", [(64, 32), (576, 32), (512, 256), (1536, 256)])
def test_blocks_match_the_plain_loop(width, block):
    x = torch.randn(3, 2, width, generator=torch.Generator().manual_seed(width)) * 4
    x[0, 0, :block] = 0  # an all-zero block stays zero
    got, scale = act_llamacpp(x)
    assert scale.shape == (3, 2, 1) and bool((scale == 1).all())
    for i in range(3):
        for j in range(2):
            want = slow_blocks(x[i, j].numpy(), block)
            np.testing.assert_allclose(got[i, j].numpy(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, x)  # it rounds
