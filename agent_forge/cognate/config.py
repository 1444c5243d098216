"""`CognateConfig`: the hyper-parameters of the Cognate model (TRM x Titans-MAG with ACT).

Standalone on purpose: this file is copied into every saved model directory (with
model.py, memory.py and recursion.py) so `AutoConfig.from_pretrained(dir,
trust_remote_code=True)` works without the agent_forge package. It imports only
transformers.

Shapes (what must match for two models to be merged by weights): vocab_size,
hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, memory_dim,
memory_hidden_size, recursion_intermediate_size. Everything else is behaviour (window,
halting, memory write strength) and may differ between specialisations of one trunk.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class CognateConfig(PretrainedConfig):
    """Cognate: 8 MAG layers (sliding-window attention + Titans neural memory, mixed by a
    learned gate), with a TRM recursion halted per token by ACT after layer
    `recursion_after_layer`.

    The defaults make the design's ~25M-parameter model (24.7M with the SmolLM2 vocabulary,
    12.6M of it the tied embeddings).

    Trunk:
        vocab_size: token count (the SmolLM2 tokenizer's 49152 by default).
        hidden_size: width of the residual stream.
        num_hidden_layers: MAG layers (8 in the design).
        num_attention_heads: attention heads (hidden_size must divide by it).
        intermediate_size: width of each layer's SwiGLU MLP.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: rotary position embedding base.
        max_position_embeddings: longest sequence the model is meant for (RoPE has no hard cap).
        initializer_range: std of the normal init of linear and embedding weights.
        tie_word_embeddings: the LM head shares the input embedding matrix.
    Sliding-window attention:
        sliding_window: each token attends to itself and the sliding_window - 1 before it.
    Titans neural long-term memory (one per layer):
        memory_dim: width of the memory's keys, values and queries.
        memory_hidden_size: hidden width of the memory MLP M(k) = W2 silu(W1 k).
        memory_chunk_size: tokens per memory update; gradients of a chunk's tokens are taken
            at the memory before the chunk and a token reads the memory as it was before its
            chunk (Titans' parallel form; 1 = the exact per-token rule).
        memory_lr_max: upper bound of the data-dependent inner learning rate theta_t.
        memory_grad_clip: each token's memory gradient is clipped to this norm before it
            enters the momentum (a guard against the inner loop's blow-ups; inf = the pure rule).
        memory_lr_bias_init / memory_momentum_bias_init / memory_forget_bias_init: initial
            biases (pre-sigmoid) of theta_t / max, eta_t (momentum, "past surprise") and
            alpha_t (forgetting gate).
        mag_gate_bias_init: initial bias of the MAG gate g (output = g*attention + (1-g)*memory).
    TRM recursion with ACT halting:
        recursion_after_layer: the recursion runs on the residual stream after this many layers.
        recursion_intermediate_size: width of the shared recursion block's MLP.
        latent_steps: latent (z) refinements per recursion step, before each answer (y) update.
        max_recursion_steps: ACT's cap on recursion steps per token.
        act_threshold: a token halts once its summed halting probability reaches this (1 - eps).
        halting_bias_init: initial bias of the halting unit; strongly negative (-3: p ~ 0.05)
            so early steps do not halt and the halting head does not collapse to one step.
        ponder_cost_weight: weight tau of the mean ponder cost (N + R) added to the LM loss.
    """

    model_type = "cognate"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size: int = 49152, hidden_size: int = 288, num_hidden_layers: int = 8,
                 num_attention_heads: int = 4, intermediate_size: int = 864, rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 2048,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True,
                 sliding_window: int = 128,
                 memory_dim: int = 64, memory_hidden_size: int = 128, memory_chunk_size: int = 16,
                 memory_lr_max: float = 0.1, memory_grad_clip: float = 1.0, memory_lr_bias_init: float = 0.0,
                 memory_momentum_bias_init: float = 2.0, memory_forget_bias_init: float = -5.0,
                 mag_gate_bias_init: float = 0.0,
                 recursion_after_layer: int = 4, recursion_intermediate_size: int = 576, latent_steps: int = 2,
                 max_recursion_steps: int = 6, act_threshold: float = 0.99, halting_bias_init: float = -3.0,
                 ponder_cost_weight: float = 0.01,
                 use_cache: bool = True, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, **kwargs):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} must divide by num_attention_heads {num_attention_heads}")
        if not 0 <= recursion_after_layer <= num_hidden_layers:
            raise ValueError(f"recursion_after_layer must be in [0, {num_hidden_layers}]")
        if max_recursion_steps < 1 or memory_chunk_size < 1 or sliding_window < 1:
            raise ValueError("max_recursion_steps, memory_chunk_size and sliding_window must be >= 1")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.sliding_window = sliding_window
        self.memory_dim = memory_dim
        self.memory_hidden_size = memory_hidden_size
        self.memory_chunk_size = memory_chunk_size
        self.memory_lr_max = memory_lr_max
        self.memory_lr_bias_init = memory_lr_bias_init
        self.memory_grad_clip = memory_grad_clip
        self.memory_momentum_bias_init = memory_momentum_bias_init
        self.memory_forget_bias_init = memory_forget_bias_init
        self.mag_gate_bias_init = mag_gate_bias_init
        self.recursion_after_layer = recursion_after_layer
        self.recursion_intermediate_size = recursion_intermediate_size
        self.latent_steps = latent_steps
        self.max_recursion_steps = max_recursion_steps
        self.act_threshold = act_threshold
        self.halting_bias_init = halting_bias_init
        self.ponder_cost_weight = ponder_cost_weight
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
