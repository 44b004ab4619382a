"""megatron-core's MLP with dropout on its inner activation (`--mlp-dropout`), the paper's best regulariser.

`RegularizedMLP` is a drop-in `module` for the MLP of a layer spec.  In training with p > 0 it
computes linear_fc1 -> dropout(silu(gate) * up) -> linear_fc2, where the SwiGLU and the dropout
are one fused op (`ops.swiglu_dropout`: the C++/CUDA kernel when built, else the torch reference)
whose backward regenerates the dropout mask from the counter-based stream instead of storing it.

The mask of each call is keyed by a 64-bit key drawn from the default torch generator (the one
hidden dropout uses: identical on the ranks of a tensor-parallel group, saved in checkpoints) and by
each element's index in the unsharded [tokens, ffn] activation, so a tensor-parallel shard drops
exactly the elements the unsharded model would: TP=2 and TP=1 train identically with MLP dropout.
In evaluation, or with p = 0, it is megatron's MLP unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from megatron_dataeff.errors import ConfigError
from megatron_dataeff.ops.swiglu_dropout import swiglu_dropout

_DROPOUT_SEED = 0x6D6C7064  # the per-call key carries the randomness; the seed only separates streams


class RegularizedMLP(MLP):
    """MLP whose inner activation (the input of linear_fc2) gets dropout `config.mlp_dropout`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mlp_dropout = float(getattr(self.config, "mlp_dropout", 0.0))
        if self.mlp_dropout > 0 and not (self.config.gated_linear_unit
                                         and self.config.activation_func is torch.nn.functional.silu):
            raise ConfigError("--mlp-dropout needs the SwiGLU MLP (gated_linear_unit with silu)")

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not (self.training and self.mlp_dropout > 0) or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        local_ffn = intermediate.shape[-1] // 2
        call_key = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        activated = swiglu_dropout(intermediate, self.mlp_dropout, call_key, _DROPOUT_SEED, training=True,
                                   col_offset=tp_rank * local_ffn, total_ffn=tp_size * local_ffn)
        return self.linear_fc2(activated)
