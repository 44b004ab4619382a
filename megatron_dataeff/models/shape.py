"""The shape of a model of the family (`models/family.py`): its sizes, and the row and parameter counts they imply.

One home for the arithmetic that FLOPs (`training/flops.py`), the memory estimate (`training/memory.py`) and
the HF weight map (`export/hf_mapping.py`) share:

    q rows   = heads x head_dim            (query projection; the attention output projection's columns)
    kv rows  = query groups x head_dim     (key projection; the value projection alike)
    a layer's matrices: linear_qkv [q + 2 kv, hidden], linear_proj [hidden, q],
                        linear_fc1 [2 ffn, hidden] (SwiGLU's gate and up), linear_fc2 [hidden, ffn]
    a layer's norms:    two RMSNorms [hidden], with QK norm two more [head_dim]
    embedding rows = the padded vocabulary (`ModelConfig.vocab_rows`); the output layer alike

`per_rank(tp)` is what one tensor-parallel rank holds of it.  Torch is not imported: the memory estimate
answers without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a model (or of one tensor-parallel rank's part of it) and whether its optional tensors exist."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int  # --kv-channels
    vocab_rows: int  # embedding rows (padded vocabulary)
    qk_layernorm: bool
    tied: bool  # output layer shares the embedding

    @classmethod
    def from_model_config(cls, m, vocab_rows: int) -> "ModelShape":
        """The shape of a ModelConfig's model with `vocab_rows` embedding rows."""
        return cls(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
                   m.kv_channels, vocab_rows, bool(m.qk_layernorm), not m.untie_embeddings_and_output_weights)

    @classmethod
    def from_run_config(cls, cfg, vocab_rows: int) -> "ModelShape":
        """The shape of a RunConfig's model with `vocab_rows` embedding rows."""
        return cls.from_model_config(cfg.model, vocab_rows)

    def per_rank(self, tp: int) -> "ModelShape":
        """What one of `tp` tensor-parallel ranks holds: its query heads, key/value groups (at least one), FFN
        columns and embedding rows; hidden size and head_dim are whole."""
        return dataclasses.replace(self, num_attention_heads=self.num_attention_heads // tp,
                                   num_query_groups=max(1, self.num_query_groups // tp),
                                   ffn_hidden_size=self.ffn_hidden_size // tp, vocab_rows=self.vocab_rows // tp)

    @property
    def q_rows(self) -> int:
        """Rows of the query projection: heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        """Rows of the key (or value) projection: groups x head_dim."""
        return self.num_query_groups * self.head_dim

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused linear_qkv: q + 2 kv."""
        return self.q_rows + 2 * self.kv_rows

    @property
    def attention_parameters(self) -> int:
        """Weights of one layer's attention: linear_qkv and the output projection."""
        return self.qkv_rows * self.hidden_size + self.hidden_size * self.q_rows

    @property
    def mlp_parameters(self) -> int:
        """Weights of one layer's SwiGLU MLP: fc1 (gate and up) and fc2."""
        return 3 * self.ffn_hidden_size * self.hidden_size

    @property
    def layer_matrix_parameters(self) -> int:
        """Weights of one layer's linear layers: attention and MLP."""
        return self.attention_parameters + self.mlp_parameters

    @property
    def layer_norm_parameters(self) -> int:
        """Weights of one layer's RMSNorms: before attention and before the MLP, and the QK norms when there."""
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_layernorm else 0)

    @property
    def embedding_parameters(self) -> int:
        """Weights of the word embedding (and of an untied output layer, each): rows x hidden."""
        return self.vocab_rows * self.hidden_size

    @property
    def final_norm_parameters(self) -> int:
        """Weights of the final RMSNorm."""
        return self.hidden_size
