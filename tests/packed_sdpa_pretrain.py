"""pretrain_diffusion.py with transformer-engine's packed sequences (THD) played by our sdpa attention on the thd
layout (models/attention.py takes cu_seqlens as a mask): the packed path around the kernel (the rows as one stream,
cu_seqlens, rotary positions per sequence, losses per row again, the pipeline's packed tensors) runs under
torchrun on CPUs, where transformer-engine does not.  Used by tests/test_distributed.py; tests/test_documents.py
takes PACKED_SDPA from here for its in-process runs."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_dataeff.models.attention_backends import AttentionChoice  # noqa: E402

PACKED_SDPA = AttentionChoice("sdpa", "sdpa", "auto", "test: sdpa on packed sequences", packed=True)

if __name__ == "__main__":
    from megatron_dataeff.models import builder

    builder.attention_choice = lambda cfg, device: PACKED_SDPA
    runpy.run_path(str(ROOT / "pretrain_diffusion.py"), run_name="__main__")
