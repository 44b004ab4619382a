"""Run lm-evaluation-harness (0.4.x) on a megatron_dataeff checkpoint (AR or masked diffusion).

    python tools/run_lm_eval.py --model megatron_dataeff --model_args load=runs/mdm/checkpoints,mc_samples=32 \
        --tasks hellaswag,piqa,social_iqa,winogrande,lambada_openai,arc_easy --batch_size 16

Registers the model `megatron_dataeff` (megatron_dataeff/evaluation/lm_eval_adapter.py) and hands
every argument to lm-eval's own command line (`--include_path DIR` for local task YAMLs).
"""

import sys

from megatron_dataeff.entry import tool_main
from megatron_dataeff.errors import ConfigError


@tool_main
def main() -> int:
    from megatron_dataeff.evaluation.lm_eval_adapter import LM_EVAL_AVAILABLE, register

    if not LM_EVAL_AVAILABLE:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'lm_eval>=0.4,<0.5'")
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
