"""Inference: a checkpoint's model in this process, AR decoding with a KV cache, the diffusion sampler.

* `loading`: the model of a checkpoint of any TP/PP layout, at TP=PP=1 in this process.
* `sampling`: AR sampling and the masked-diffusion sampler shared with the exported modeling file.
* `kv_cache`: incremental AR decoding of a megatron GPTModel with megatron-core's static KV cache.
* `generate`: text from a checkpoint (what `tools/generate.py` prints).
"""
