"""megatron-core GPT models: layer specs (causal / bidirectional, MLP dropout), builder, presets."""
