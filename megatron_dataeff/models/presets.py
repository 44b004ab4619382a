"""Model shapes by name (`--model-preset`); explicit shape flags override a preset's values."""

PRESETS: dict[str, dict] = {
    # A few minutes on a laptop CPU: the quickstart and the tests.
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                 num_query_groups=2, seq_length=128),
    # A small CPU/GPU study model (~20M parameters without embeddings).
    "small": dict(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                  num_query_groups=4, seq_length=512),
    # The paper's model: the Qwen3-0.6B layout trained from scratch.
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, qk_layernorm=True, seq_length=4096,
                       max_position_embeddings=40960, rotary_base=1000000, norm_epsilon=1e-6),
    "qwen3-1.7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                       num_query_groups=8, kv_channels=128, qk_layernorm=True, seq_length=4096,
                       max_position_embeddings=40960, rotary_base=1000000, norm_epsilon=1e-6),
}
