"""megatron_dataeff: AR, token-dropout and masked-diffusion pretraining on megatron-core for the
data-constrained regime (the same unique tokens seen for many epochs)."""

__version__ = "0.1.0"
