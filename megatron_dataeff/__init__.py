"""megatron_dataeff: AR, token-dropout and masked-diffusion pretraining on megatron-core for the
data-constrained regime (the same unique tokens seen for many epochs)."""

__version__ = "0.1.0"

from megatron_dataeff import deferred_compile as _deferred_compile

_deferred_compile.install()  # megatron-core's torch.compile'd fusions compile on first use, not at import
