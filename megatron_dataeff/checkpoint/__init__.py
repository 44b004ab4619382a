"""Checkpoints: the format, the storage and the state, for every client (trainer, export, import, evaluation).

    format.py       names (iter_N, `latest`, Megatron-LM's `release`), discovery, metadata JSON, publication,
                    compatibility checks; recognises Megatron-LM's checkpoints
    storage.py      torch DCP / megatron-core dist_checkpointing I/O: sharded loads fitted to what a checkpoint
                    holds, region reads and chunk writes that never hold the whole model
    state.py        save / load of the state handed in (model, optimizer, RNG; the caller's metadata)
    async_save.py   --async-save's background writer: megatron-core's own or NVRx's, as the release has them
    reading.py      a checkpoint's run config as read outside training (TP=PP=1, a kernel this machine has,
                    the view of a dual model)
    megatron_lm.py  Megatron-LM's checkpoints, read and written

Nothing here knows a Trainer: the trainer is one client, handing in its model, optimizer and metadata.
"""
