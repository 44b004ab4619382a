"""Configuration of a masked-diffusion (bidirectional) GPT exported by megatron_dataeff.

Standalone: imports only transformers, so it can be copied into an export directory and loaded with
`AutoConfig.from_pretrained(path, trust_remote_code=True)`.  The architecture is Llama's (RMSNorm,
SwiGLU, RoPE, no biases, grouped-query attention; Qwen3's per-head RMSNorm on queries and keys when
`qk_layernorm`), with attention in both directions.
"""

from transformers import PretrainedConfig


class DataEffMDMConfig(PretrainedConfig):
    """Shape of a masked-diffusion LM plus its mask token."""

    model_type = "dataeff_mdm"

    def __init__(
        self,
        vocab_size=384,  # embedding rows (the tokenizer's ids + mask token, padded)
        valid_vocab_size=None,  # ids in use; rows from here on are padding, never sampled
        hidden_size=128,
        intermediate_size=384,  # SwiGLU inner width
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,  # grouped-query attention; None = num_attention_heads
        head_dim=None,  # None = hidden_size // num_attention_heads
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        qk_layernorm=False,  # per-head RMSNorm on queries and keys (Qwen3)
        mask_token_id=None,  # the [MASK] id the model was trained to fill in
        bidirectional=True,  # attention in both directions (what the model was trained with)
        block_size=None,  # block diffusion (BD3-LM): blocks of this many tokens, generated left to right
        tie_word_embeddings=True,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.valid_vocab_size = vocab_size if valid_vocab_size is None else valid_vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.qk_layernorm = qk_layernorm
        self.mask_token_id = mask_token_id
        self.bidirectional = bidirectional
        self.block_size = block_size
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
