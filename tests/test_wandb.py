"""Weights & Biases logging (optional): a real offline W&B run holds what metrics.jsonl holds, and a job
resumed in the same run directory continues the same W&B run."""

import glob
import json
import struct

import pytest

from tests.conftest import losses, run_pretrain

pytest.importorskip("wandb")  # installed with the test extra; the framework itself does not need it


def _wandb_records(path: str) -> list:
    """The protobuf records of an offline run file (run-ID.wandb): W&B's LevelDB-style log, 7-byte header,
    32 KiB blocks of [crc32 u32, length u16, type u8] chunks (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _offline_runs(save_dir):
    """[(run id, project, {(split, iteration): loss}, exit code)] of each offline run under save_dir."""
    runs = []
    for path in sorted(glob.glob(f"{save_dir}/wandb/offline-run-*/run-*.wandb")):
        run_id = project = exit_code = None
        history = {}
        for rec in _wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id, project = rec.run.run_id, rec.run.project
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item}
                for split in ("train", "valid"):
                    if f"{split}/loss" in items:
                        history[(split, items["iteration"])] = items[f"{split}/loss"]
            elif kind == "exit":
                exit_code = rec.exit.exit_code
        runs.append((run_id, project, history, exit_code))
    return runs


def test_offline_wandb_run_matches_metrics_and_resume_continues_it(tmp_path, monkeypatch):
    """Two launches of one run (an --exit-interval stop, then a resume) log to one W&B run id whose history
    equals metrics.jsonl's losses, iteration by iteration."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    common = ["--train-iters", "4", "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1",
              "--eval-interval", "2", "--eval-iters", "1", "--save", str(ckpt), "--load", str(ckpt),
              "--wandb-project", "dataeff-test", "--wandb-exp-name", "tiny-ar"]
    run_pretrain([*common, "--exit-interval", "2"], run_dir)
    records = run_pretrain(common, run_dir)
    runs = _offline_runs(run_dir / "wandb")
    assert len(runs) == 2
    assert {r[0] for r in runs} == {(run_dir / "wandb" / "wandb_run_id").read_text().strip()}
    assert all(r[1] == "dataeff-test" and r[3] == 0 for r in runs)
    logged = {**runs[0][2], **runs[1][2]}
    train = {r["iteration"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(k[1] for k in logged if k[0] == "train") == [1, 2, 3, 4] == sorted(train)
    for (split, it), loss in logged.items():
        assert loss == next(r["loss"] for r in records if r["split"] == split and r["iteration"] == it)
    assert losses(records, "valid")


def test_wandb_project_without_wandb_is_refused(monkeypatch):
    """--wandb-project with no wandb installed is an error naming the flag, before any process group."""
    import importlib.util

    from megatron_dataeff.config import ConfigError
    from megatron_dataeff.training.metrics import check_wandb

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="--wandb-project p: the wandb package is not installed"):
        check_wandb("p")
    check_wandb(None)
