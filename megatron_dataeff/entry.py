"""The frame every tool's `main` runs in: one place that decides what a user sees when something fails.

    @tool_main(process_group=True)
    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        ...                       # call a package function, print
        return 0

`tool_main` silences megatron-core's import-time warnings about optional accelerators (we report what
we use ourselves), runs `main` (inside `owned_process_group()` when it builds models: a group it starts is
torn down, a caller's is left alone), prints a `UserError` as `error: <message>` on stderr and returns 2
(or the tool's documented code), and lets every other exception through with its traceback: that is a bug
(`megatron_dataeff/errors.py`).  torch is imported only by tools that ask for the process group.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable

from megatron_dataeff.errors import UserError

OPTIONAL_ACCELERATOR_WARNINGS = ".*(Transformer Engine|Apex).*"


def ignore_optional_accelerator_warnings() -> None:
    """megatron-core warns at import when transformer-engine or apex is missing; neither is needed here."""
    warnings.filterwarnings("ignore", message=OPTIONAL_ACCELERATOR_WARNINGS)


def report_user_error(exc: UserError) -> None:
    """Print a UserError as its one `error: ...` line.  One that every rank of a distributed run raised alike
    (`exc.agreed`, e.g. a failed checkpoint write) is printed by rank 0 alone, and no rank returns before it has:
    the first worker to exit makes torchrun stop the others, and two ranks writing at once can mix their lines."""
    import torch.distributed as dist

    collective = getattr(exc, "agreed", False) and dist.is_initialized() and dist.get_world_size() > 1
    if not collective or dist.get_rank() == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if collective:
        dist.barrier()


def tool_main(fn: Callable[..., int] | None = None, *, process_group: bool = False,
              user_error_exit: int = 2) -> Callable[..., int]:
    """Decorate a tool's `main` (any signature) with the shared frame; usable bare (`@tool_main`) or with
    options (`@tool_main(process_group=True)`).  `user_error_exit` is the exit status of a `UserError`."""

    def frame(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            ignore_optional_accelerator_warnings()
            try:
                if not process_group:
                    return main(*args, **kwargs)
                from megatron_dataeff.distributed import owned_process_group

                with owned_process_group():
                    return main(*args, **kwargs)
            except UserError as exc:  # bad input: one line naming it; anything else keeps its traceback
                report_user_error(exc)
                return user_error_exit

        return run

    return frame if fn is None else frame(fn)
