"""`--async-save`'s background writer, as the installed megatron-core offers one: the one place that knows its kinds.

megatron-core up to 0.16 has one asynchronous save, its own: `dist_checkpointing.save(async_sharded_save=True)`
returns a request that its `AsyncCallsQueue` runs in a forked process.  From 0.17 `save` also takes
`async_strategy`: "nvrx" (its default) builds a request for nvidia-resiliency-ext's queue (NVRx, a separate
package), "mcore" one for its own queue, which it calls deprecated.  `open_queue()` takes NVRx's when that package
is installed and megatron-core can use it, else megatron-core's own while the release has one, and otherwise
refuses --async-save by name; `save_kwargs(queue)` asks `save` for requests of that queue.  Both queues are used
through the same methods (`schedule_async_request`, `maybe_finalize_async_calls`, `get_num_unfinalized_calls`,
`async_calls`); NVRx is not a dependency, and CI runs megatron-core's own.

megatron-core >= 0.17 also writes a synchronous save through its own asynchronous writer, and so logs "MCore's async
save is deprecated ... set `async_strategy` to `nvrx`" at the first save of every run, --async-save or not: advice
about an argument of its API that our code passes, not a flag of the user's.  `quiet_deprecation()` drops that one
message; the start-up line of --async-save says instead which writer is used and how to get NVRx's.
"""

from __future__ import annotations

import functools
import logging

from megatron_dataeff.checkpoint.format import megatron_core_version
from megatron_dataeff.errors import ConfigError

NAMES = {"mcore": "megatron-core's own", "nvrx": "nvidia-resiliency-ext's (NVRx)"}


def _megatron_strategies():
    """megatron-core's `get_async_strategy(name) -> (name, {"AsyncCallsQueue": ..., ...})`, or None before 0.17."""
    try:
        from megatron.core.dist_checkpointing.strategies.torch import get_async_strategy
    except ImportError:  # megatron-core <= 0.16: one asynchronous save, its own, with no choice of it
        return None
    return get_async_strategy


def open_queue():
    """The queue of background writes --async-save uses here (NVRx's, else megatron-core's own); a ConfigError
    naming --async-save when the installed megatron-core has neither."""
    get_async_strategy = _megatron_strategies()
    if get_async_strategy is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        return AsyncCallsQueue()
    for strategy in ("nvrx", "mcore"):
        try:
            _, modules = get_async_strategy(strategy)
        except (ImportError, TypeError):  # NVRx not installed; a release without its own ("not supported")
            continue
        return modules["AsyncCallsQueue"]()
    raise ConfigError(f"--async-save: megatron-core {megatron_core_version()} has no background writer of its own "
                      f"and nvidia-resiliency-ext, whose writer it uses instead, is not installed: pip install "
                      f"nvidia-resiliency-ext, or drop --async-save (saves then hold training while they write)")


def _strategy(queue) -> str:
    """"nvrx" or "mcore": whose queue it is (a request must be made for the queue that runs it)."""
    return "nvrx" if type(queue).__module__.split(".")[0] == "nvidia_resiliency_ext" else "mcore"


def save_kwargs(queue) -> dict:
    """The arguments `dist_checkpointing.save` needs beside `async_sharded_save` to make requests `queue` runs
    (none for a synchronous save, `queue` None, or before megatron-core 0.17)."""
    if queue is None or _megatron_strategies() is None:
        return {}
    return {"async_strategy": _strategy(queue)}


def describe(queue) -> str:
    """The start-up line of --async-save: which writer saves in the background."""
    strategy = _strategy(queue)
    line = f"--async-save: checkpoints are written in the background by {NAMES[strategy]} writer"
    if strategy == "mcore" and _megatron_strategies() is not None:
        line += (f" (megatron-core {megatron_core_version()} prefers NVRx's: pip install nvidia-resiliency-ext "
                 f"to use it)")
    return line


@functools.cache
def quiet_deprecation() -> None:
    """Drop megatron-core's (>= 0.17) notice that its own asynchronous save is deprecated (see the module doc)."""
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
        lambda record: "MCore's async save is deprecated" not in record.getMessage())
