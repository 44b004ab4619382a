"""Hugging Face export and import.

* `hf_mapping`: the declarative megatron <-> HF (Llama / Qwen3 names) weight map and its checks.
* `hf_export`: a checkpoint of any layout -> an HF directory (stock Llama / Qwen3 for AR models,
  our own modeling file for masked diffusion).
* `hf_import`: an HF Llama / Qwen3 (or our diffusion export) directory -> a model-only checkpoint.
* `configuration_dataeff_mdm.py`, `modeling_dataeff_mdm.py`: standalone files copied into diffusion
  exports (they import only torch and transformers).
"""
