"""Pretrain AR, token-dropout and masked-diffusion GPT models on megatron-core (TP / PP / DP).

    # a small masked-diffusion model on the embedded corpus, on this machine's CPU or GPU
    python pretrain_diffusion.py --objective mdm --train-iters 200 --eval-interval 50

    # 2 processes, tensor parallel, AR with token dropout
    torchrun --nproc_per_node=2 pretrain_diffusion.py --objective ar --token-dropout-rate 0.3 \
        --tensor-model-parallel-size 2 --train-iters 200

`python pretrain_diffusion.py --help` lists every flag (Megatron-LM's names where they exist).
"""

import sys
import warnings


def main(argv=None) -> int:
    # megatron-core warns at import about optional accelerators; we report what we use ourselves.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from megatron_dataeff.arguments import parse_config
    from megatron_dataeff.distributed import shutdown
    from megatron_dataeff.entry import report_user_error
    from megatron_dataeff.errors import UserError
    from megatron_dataeff.training.loop import Trainer

    cfg = parse_config(argv)
    trainer = None
    rc = 1  # an exception that escapes leaves this: the W&B run is marked failed
    try:
        trainer = Trainer(cfg)
        trainer.train()
        rc = 0
    except UserError as exc:  # bad input: one line naming it; anything else is a bug and keeps its traceback
        report_user_error(exc)
        rc = 2
    finally:
        if trainer is not None:
            trainer.close(rc)
        shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
