"""Titans neural long-term memory (Behrouz et al. 2024), the memory half of a MAG layer.

The memory is a 2-layer MLP  M(k) = W2 silu(W1 k)  whose weights are *state*: each
sequence starts from learned weights (W1_0, W2_0), and every token writes to them with a
gradient step on the associative loss, with momentum (the "surprise") and a forgetting gate:

    loss(M; k_t, v_t) = || M(k_t) - v_t ||^2
    S_t = eta_t * S_{t-1} - theta_t * grad loss(M_ref; k_t, v_t)      (momentum, S_0 = 0)
    M_t = (1 - alpha_t) * M_{t-1} + S_t                               (forgetting)

with k_t, v_t, q_t linear projections of the token (keys and queries L2-normalised) and
alpha_t, eta_t, theta_t = lr_max * sigmoid(.) data-dependent scalars per token.

Chunks (the paper's parallel form): tokens are grouped in chunks of `chunk_size` from
position 0. All gradients of a chunk are taken at M_ref = the memory before the chunk, so
they are computed at once; the two linear recurrences over the chunk are then closed-form
weighted sums (decay products from cumulative log-sums), so no per-token weight copy is
ever built. A token reads the memory as it was before its chunk: y_t = M_ref(q_t), i.e.
the memory holds the past and sliding-window attention the present. chunk_size = 1 is
the exact per-token rule above (the test compares against a plain per-token loop).

Stability (the trap titans-pytorch users report as NaNs): each token's gradient is clipped
to norm `memory_grad_clip` before it enters the momentum (theta_t is scaled down), and the
reads are RMS-normalised before the output projection. Without the clip, a freshly
initialised 8-layer model (width 64, 128 tokens, chunks of 16) gave NaN losses within its
first steps: a chunk's summed steps, amplified by the momentum, overshoot and the memory's
weights grow geometrically.

Padding: a masked token gets theta = 0, eta = 1, alpha = 0; with left padding the memory is
then untouched (S is still 0), so padded rows read what unpadded ones do (for chunk_size 1;
larger chunks are counted from the first position, pads included).

Decoding with a cache: `MemoryState` carries the weights and momentum after the last
complete chunk plus the keys/values/gates of the unfinished chunk, so feeding tokens one by
one gives exactly what one full forward gives.

Our own code rather than `titans-pytorch`: the memory is ~200 readable lines, must be saved
as self-contained remote code (no extra dependency in a model directory), and must carry a
cache state that matches the full forward exactly; the package's users also report NaNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .recursion import RMSNorm


@dataclass
class MemoryState:
    """One layer's memory for a batch: weights and momentum after the last full chunk,
    plus the unfinished chunk's tokens (k, v, alpha, eta, theta), None when empty."""

    w1: torch.Tensor  # (B, H, D)
    w2: torch.Tensor  # (B, D, H)
    s1: torch.Tensor  # momentum of w1
    s2: torch.Tensor  # momentum of w2
    pending: tuple | None = None

    def select(self, index: torch.Tensor) -> "MemoryState":
        """The state of the batch rows `index` (beam search reordering)."""
        pending = None if self.pending is None else tuple(t.index_select(0, index) for t in self.pending)
        return MemoryState(*(t.index_select(0, index) for t in (self.w1, self.w2, self.s1, self.s2)), pending)


def memory_read(w1: torch.Tensor, w2: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """M(k) = W2 silu(W1 k) for keys (B, C, D) with per-row weights (B, H, D), (B, D, H)."""
    hidden = F.silu(torch.einsum("bhd,bcd->bch", w1, keys))
    return torch.einsum("bdh,bch->bcd", w2, hidden)


def associative_gradient_factors(w1, w2, keys, values):
    """Closed-form gradients of ||M(k_t) - v_t||^2 at (w1, w2) for every token t, as factors:
    grad W2_t = out_grad_t a_t^T and grad W1_t = hidden_grad_t k_t^T. Returns (out_grad,
    a, hidden_grad) of shapes (B, C, D), (B, C, H), (B, C, H)."""
    pre = torch.einsum("bhd,bcd->bch", w1, keys)
    act = F.silu(pre)
    out_grad = 2.0 * (torch.einsum("bdh,bch->bcd", w2, act) - values)
    sig = torch.sigmoid(pre)
    silu_slope = sig * (1.0 + pre * (1.0 - sig))
    hidden_grad = torch.einsum("bdh,bcd->bch", w2, out_grad) * silu_slope
    return out_grad, act, hidden_grad


def _log_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(torch.log(x.clamp_min(1e-12)), dim=1)


def clipped_rates(theta, out_grad, act, hidden_grad, keys, grad_clip: float):
    """theta_t * min(1, grad_clip / ||grad_t||): each token's gradient (over W1 and W2) is
    clipped to norm grad_clip before it enters the momentum. The norms come from the factors:
    ||u a^T|| = ||u|| ||a||."""
    if grad_clip == float("inf"):
        return theta
    sq = out_grad.pow(2).sum(-1) * act.pow(2).sum(-1) + hidden_grad.pow(2).sum(-1) * keys.pow(2).sum(-1)
    return theta * (grad_clip / sq.clamp_min(1e-24).sqrt()).clamp(max=1.0)


def chunk_update(state: MemoryState, keys, values, alpha, eta, theta, grad_clip: float = float("inf")) -> MemoryState:
    """Apply one whole chunk (keys, values (B, C, D); gates (B, C)) to the memory, with every
    gradient taken at the memory before the chunk. Closed form of the two recurrences:
    S_end = P_end S_prev - sum_i D[end,i] theta_i g_i and
    M_end = A M_prev + (sum_j c_j P_j) S_prev - sum_i (sum_j c_j D[j,i]) theta_i g_i,
    with D[j,i] = prod_{l=i+1..j} eta_l, P_j = prod_{l<=j} eta_l, c_j = prod_{l>j} (1 - alpha_l)."""
    out_grad, act, hidden_grad = associative_gradient_factors(state.w1, state.w2, keys, values)
    theta = clipped_rates(theta, out_grad, act, hidden_grad, keys, grad_clip)
    log_eta = _log_cumsum(eta)  # (B, C)
    log_keep = _log_cumsum(1.0 - alpha)
    size = eta.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=eta.device).tril()
    decay = torch.exp((log_eta[:, :, None] - log_eta[:, None, :]).masked_fill(~causal, float("-inf")))
    carry = torch.exp(log_eta)  # P_j
    keep_after = torch.exp(log_keep[:, -1:] - log_keep)  # c_j
    keep_all = torch.exp(log_keep[:, -1])  # A
    to_memory = torch.einsum("bj,bji->bi", keep_after, decay) * theta
    to_momentum = decay[:, -1, :] * theta

    def summed(coef):  # sum_i coef_i g_i for W1 and W2
        return (torch.einsum("bi,bih,bid->bhd", coef, hidden_grad, keys),
                torch.einsum("bi,bid,bih->bdh", coef, out_grad, act))

    g1_s, g2_s = summed(to_momentum)
    g1_m, g2_m = summed(to_memory)
    from_momentum = (keep_after * carry).sum(1)[:, None, None]
    p_end, keep_all = carry[:, -1, None, None], keep_all[:, None, None]
    return MemoryState(w1=keep_all * state.w1 + from_momentum * state.s1 - g1_m,
                       w2=keep_all * state.w2 + from_momentum * state.s2 - g2_m,
                       s1=p_end * state.s1 - g1_s, s2=p_end * state.s2 - g2_s)


def run_memory(state: MemoryState, keys, values, queries, alpha, eta, theta, chunk_size: int,
               grad_clip: float = float("inf")):
    """Read and write the memory over new tokens (B, T, .), continuing any unfinished chunk of
    `state`. Returns (reads (B, T, D), the state after the last token)."""
    pending = state.pending
    done = 0 if pending is None else pending[0].shape[1]
    seq = (keys, values, alpha, eta, theta)
    if pending is not None:
        seq = tuple(torch.cat([old, new], dim=1) for old, new in zip(pending, seq))
    total, reads = done + keys.shape[1], []
    state = MemoryState(state.w1, state.w2, state.s1, state.s2)
    for start in range(0, total, chunk_size):
        end = min(start + chunk_size, total)
        first_new = max(start, done)
        if first_new < end:
            reads.append(memory_read(state.w1, state.w2, queries[:, first_new - done:end - done]))
        part = tuple(t[:, start:end] for t in seq)
        if end - start == chunk_size:
            state = chunk_update(state, *part, grad_clip=grad_clip)
        else:
            state.pending = part
    return torch.cat(reads, dim=1), state


class NeuralMemory(nn.Module):
    """Projections, gates and initial weights of one layer's Titans memory."""

    def __init__(self, config):
        super().__init__()
        hidden, dim, width = config.hidden_size, config.memory_dim, config.memory_hidden_size
        self.chunk_size, self.lr_max = config.memory_chunk_size, config.memory_lr_max
        self.grad_clip = config.memory_grad_clip
        self.key = nn.Linear(hidden, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.query = nn.Linear(hidden, dim, bias=False)
        self.read_norm = RMSNorm(dim, config.rms_norm_eps)
        self.out = nn.Linear(dim, hidden, bias=False)
        self.gates = nn.Linear(hidden, 3)  # forget (alpha), momentum (eta), learning rate (theta)
        self.w1_init = nn.Parameter(torch.zeros(width, dim))
        self.w2_init = nn.Parameter(torch.zeros(dim, width))

    def initial_state(self, batch: int) -> MemoryState:
        w1, w2 = self.w1_init.expand(batch, -1, -1), self.w2_init.expand(batch, -1, -1)
        return MemoryState(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2))

    def gate_values(self, x: torch.Tensor, mask: torch.Tensor | None):
        """(alpha, eta, theta), each (B, T); masked tokens leave the memory alone."""
        gates = torch.sigmoid(self.gates(x).float())
        alpha, eta, theta = gates[..., 0], gates[..., 1], self.lr_max * gates[..., 2]
        if mask is not None:
            keep = mask.to(torch.bool)
            alpha, theta = alpha * keep, theta * keep
            eta = torch.where(keep, eta, torch.ones_like(eta))
        return alpha, eta, theta

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, state: MemoryState | None = None):
        """Memory reads projected back to the residual width, and the new state."""
        if state is None:
            state = self.initial_state(x.shape[0])
        keys = F.normalize(self.key(x).float(), dim=-1)
        queries = F.normalize(self.query(x).float(), dim=-1)
        values = self.value(x).float()
        gates = self.gate_values(x, mask)
        with torch.autocast(x.device.type, enabled=False):  # decay products and weight updates in fp32
            reads, state = run_memory(_fp32(state), keys.float(), values.float(), queries.float(),
                                      *(g.float() for g in gates), self.chunk_size, self.grad_clip)
        # in the residual stream's dtype: a quantized `out` (packed uint8 weights) has no float dtype to read
        return self.out(self.read_norm(reads.to(x.dtype))), state


def _fp32(state: MemoryState) -> MemoryState:
    pending = None if state.pending is None else tuple(t.float() for t in state.pending)
    return MemoryState(state.w1.float(), state.w2.float(), state.s1.float(), state.s2.float(), pending)
