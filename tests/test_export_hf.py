"""HF export: exported models compute the megatron model's logits (real transformers classes).

Parity tolerance: max abs logit error <= 1e-4 in fp32 (measured ~1e-6; the two sides differ only in
the order of floating-point reductions).  Checkpoints are random tiny models (2 layers, hidden 64)
whose weights, norms included, are all drawn at random so that a wrong mapping cannot pass.
"""

import dataclasses
import json
import os

import pytest
import torch

from megatron_dataeff.arguments import build_parser, config_from_args
from megatron_dataeff.data.tokenizers import ByteTokenizer
from megatron_dataeff.export import hf_export
from megatron_dataeff.export.hf_export import export_checkpoint, export_model
from megatron_dataeff.export.hf_import import save_model_checkpoint
from megatron_dataeff.export.hf_mapping import (ModelShape, UnsupportedModelError, check_megatron_model,
                                                megatron_to_hf, merge_qkv, split_qkv)
from megatron_dataeff.models.builder import build_model
from tests.conftest import run_pretrain

TOL = 1e-4
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
        "--seq-length", "32"]


def make_checkpoint(save_dir, flags, seed=0, tokenizer=None):
    """A random tiny model saved as a (model-only) checkpoint with ByteTokenizer metadata (or `tokenizer`'s)."""
    cfg = config_from_args(build_parser().parse_args(TINY + list(flags)))
    cfg.parallel.device = "cpu"
    cfg.validate_layout(1)
    model = build_model(cfg, 258, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights: away from 1 so that a misplaced norm shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                std = 0.5 if "embedding" in name else p.shape[1] ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))
    tok = tokenizer or ByteTokenizer()
    meta = {"iteration": 7, "consumed_samples": 0, "epoch": 0.0, "scheduler": None, "config": cfg.to_dict(),
            "tokenizer": tok.metadata(), "mask_token_id": 257, "vocab_ids": 258, "unique_tokens": None,
            "world_size": 1}
    save_model_checkpoint(model, meta, str(save_dir))
    return str(save_dir)


def megatron_logits(ckpt, tokens, view=None):
    from megatron_dataeff.inference.loading import load_model_for_inference

    model, _, _ = load_model_for_inference(ckpt, view=view)
    pos = torch.arange(tokens.shape[1])[None, :].expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, pos, None)


def hf_logits(hf_dir, tokens, remote=False):
    from transformers import AutoModel, AutoModelForCausalLM

    if remote:
        model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return type(model).__name__, model(tokens).logits


TOKENS = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(1))

CASES = {
    # name: (flags, expected HF class, extra export kwargs)
    "llama-gqa-tied": (["--objective", "ar", "--num-query-groups", "2", "--rotary-base", "5000",
                        "--norm-epsilon", "1e-6"], "LlamaForCausalLM", {}),
    "qwen3-untied-sharded": (["--objective", "ar", "--qk-layernorm", "--untie-embeddings-and-output-weights",
                              "--num-query-groups", "1", "--kv-channels", "32", "--rotary-base", "1000000"],
                             "Qwen3ForCausalLM", {"max_shard_size": "60KB"}),
    "mdm-qk-gqa-tied": (["--objective", "mdm", "--qk-layernorm", "--num-query-groups", "2",
                         "--rotary-base", "20000"], "DataEffMDMForMaskedLM", {}),
    "mdm-untied": (["--objective", "mdm", "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-6"],
                   "DataEffMDMForMaskedLM", {}),
    # one dual-objective model, both ways: a stock causal LM and the diffusion model
    "dual-as-ar": (["--objective", "dual", "--num-query-groups", "2"], "LlamaForCausalLM", {"view": "ar"}),
    "dual-as-mdm": (["--objective", "dual", "--num-query-groups", "2"], "DataEffMDMForMaskedLM", {"view": "mdm"}),
}


@pytest.fixture(scope="module")
def exports(megatron_cpu, tmp_path_factory):
    """name -> (checkpoint, HF dir) for every case, exported in fp32."""
    out = {}
    for i, (name, (flags, _, kwargs)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        ckpt = make_checkpoint(root / "ckpt", flags, seed=i)
        out[name] = (ckpt, export_checkpoint(ckpt, str(root / "hf"), dtype="fp32", **kwargs))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_exported_logits_match_megatron(exports, name):
    """The exported model (stock Llama / Qwen3, or our remote-code mdm model) gives megatron's logits."""
    ckpt, hf_dir = exports[name]
    cls, got = hf_logits(hf_dir, TOKENS, remote=CASES[name][1].startswith("DataEff"))
    want = megatron_logits(ckpt, TOKENS, view=CASES[name][2].get("view"))
    assert cls == CASES[name][1]
    assert got.shape == want.shape == (2, 24, 384)  # HF vocab = megatron's padded rows
    err = (got - want).abs().max().item()
    print(f"parity {name}: max abs logit error {err:.2e}")
    assert err <= TOL


def test_export_files_and_config(exports):
    """An AR export is stock (no auto_map, no .py); mdm carries its modeling files, mask id and flag."""
    _, ar = exports["llama-gqa-tied"]
    _, sharded = exports["qwen3-untied-sharded"]
    _, mdm = exports["mdm-qk-gqa-tied"]
    cfg = json.load(open(os.path.join(ar, "config.json")))
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and cfg["tie_word_embeddings"] is True
    assert cfg["megatron_dataeff"]["vocab_ids"] == 258 and cfg["rope_theta"] == 5000.0
    assert not any(f.endswith(".py") for f in os.listdir(ar))
    gen = json.load(open(os.path.join(ar, "generation_config.json")))
    assert gen["eos_token_id"] == 256 and gen["suppress_tokens"] == list(range(257, 384))
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    cfg = json.load(open(os.path.join(mdm, "config.json")))
    assert cfg["mask_token_id"] == 257 and cfg["bidirectional"] is True and cfg["valid_vocab_size"] == 258
    assert cfg["auto_map"]["AutoModel"] == "modeling_dataeff_mdm.DataEffMDMForMaskedLM"
    assert {"configuration_dataeff_mdm.py", "modeling_dataeff_mdm.py"} <= set(os.listdir(mdm))


def test_modeling_files_are_standalone():
    """The files copied into diffusion exports import only torch, transformers and each other."""
    import ast

    here = os.path.dirname(hf_export.__file__)
    for name in hf_export.MDM_FILES:
        tree = ast.parse(open(os.path.join(here, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers", "typing", "."}, (name, roots)


def test_byte_tokenizer_exported_equivalent(exports):
    """The ByteTokenizer's HF form encodes and decodes as ByteTokenizer does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports["llama-gqa-tied"][1])
    text = "héllo wörld\n\t  ✓ x"
    assert tok(text).input_ids == ByteTokenizer().tokenize(text)
    assert tok.decode(ByteTokenizer().tokenize(text)) == text
    assert (tok.eos_token_id, tok.mask_token_id, len(tok)) == (256, 257, 258)


def test_export_from_tensor_parallel_checkpoint(megatron_cpu, tmp_path):
    """A checkpoint trained at TP=2 (2 gloo processes) exports in one step, matches its model, and carries a
    model card with the run's objective, data budget, flags and validation numbers."""
    ckpt = tmp_path / "ckpt"
    records = run_pretrain(TINY + ["--objective", "ar", "--qk-layernorm", "--num-query-groups", "2",
                                   "--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "2",
                                   "--train-iters", "3", "--eval-iters", "1", "--eval-interval", "1",
                                   "--micro-batch-size", "2", "--token-dropout-rate", "0.2", "--weight-decay", "0.3",
                                   "--save", str(ckpt)], tmp_path / "run", nproc=2)
    from tools.export_hf import main

    assert main(["--load", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    cls, got = hf_logits(str(tmp_path / "hf"), TOKENS)
    err = (got - megatron_logits(str(ckpt), TOKENS)).abs().max().item()
    print(f"parity tp2-qwen3: max abs logit error {err:.2e}")
    assert cls == "Qwen3ForCausalLM" and err <= TOL
    # The model card: objective, data budget, flags, and the run's own validation numbers (last and best).
    card = (tmp_path / "hf" / "README.md").read_text()
    run = json.load(open(tmp_path / "run" / "run.json"))
    valid = [r for r in records if r["split"] == "valid"]
    best = min(valid, key=lambda r: r["loss"])
    assert "pipeline_tag: text-generation" in card and "Qwen3ForCausalLM" in card
    assert "ar + token dropout 0.2" in card and "--token-dropout-rate 0.2" in card and "--weight-decay 0.3" in card
    assert f"{run['unique_tokens']:,}" in card and "3 iterations" in card
    assert f"| last | 3 | {valid[-1]['epoch']:.2f} | loss {valid[-1]['loss']:.4f}" in card
    assert f"| best | {best['iteration']} | {best['epoch']:.2f} | loss {best['loss']:.4f}" in card


@pytest.mark.distributed
def test_export_from_pipeline_parallel_checkpoint(megatron_cpu, tmp_path):
    """A checkpoint trained at PP=2 (2 gloo processes, 2 layers a stage, tied embedding whose copy
    lives on the last stage) exports in one step: all 4 layers in order, final norm, lm_head."""
    ckpt = tmp_path / "ckpt"
    run_pretrain(TINY + ["--num-layers", "4", "--objective", "ar", "--num-query-groups", "2",
                         "--pipeline-model-parallel-size", "2", "--train-iters", "2", "--eval-iters", "0",
                         "--micro-batch-size", "2", "--save", str(ckpt)], tmp_path / "run", nproc=2)
    from tools.export_hf import main

    assert main(["--load", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert json.load(open(tmp_path / "hf" / "config.json"))["num_hidden_layers"] == 4
    cls, got = hf_logits(str(tmp_path / "hf"), TOKENS)
    err = (got - megatron_logits(str(ckpt), TOKENS)).abs().max().item()
    print(f"parity pp2-llama: max abs logit error {err:.2e}")
    assert cls == "LlamaForCausalLM" and err <= TOL


def test_bf16_export_is_bf16_and_close(exports, tmp_path):
    """--dtype bf16 writes bf16 weights that still give nearly the same logits."""
    from safetensors import safe_open

    ckpt, _ = exports["llama-gqa-tied"]
    out = export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="bf16")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    _, got = hf_logits(out, TOKENS)
    want = megatron_logits(ckpt, TOKENS)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"bf16 export: max abs logit error {err:.2e} (max |logit| {scale:.1f})")
    assert 0 < err < 0.05 * scale


def test_export_replaces_only_when_complete(exports, tmp_path, monkeypatch):
    """A failing export leaves the previous export intact (and no temporary directory); a directory
    that is not an export is never replaced."""
    from megatron_dataeff.inference.loading import load_model_for_inference

    ckpt, _ = exports["llama-gqa-tied"]
    model, cfg, meta = load_model_for_inference(ckpt)
    out = tmp_path / "hf"
    export_model(model, cfg, meta, str(out))
    before = sorted(os.listdir(out))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_export, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, cfg, meta, str(out))
    assert sorted(os.listdir(out)) == before
    assert os.listdir(tmp_path) == ["hf"]
    monkeypatch.undo()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an HF export"):
        export_model(model, cfg, meta, str(other))
    assert (other / "todo.txt").read_text() == "keep me"


def test_mapping_refuses_what_it_cannot_represent(megatron_cpu):
    """Unknown tensors, wrong shapes and unsupported megatron options raise errors naming them."""
    cfg = config_from_args(build_parser().parse_args(TINY + ["--num-query-groups", "2"]))
    cfg.validate_layout(1)
    model = build_model(cfg, 258, "cpu")
    shape = ModelShape.from_run_config(cfg, 384)
    sd = dict(model.state_dict())
    assert set(megatron_to_hf(sd, shape)) >= {"model.layers.1.self_attn.k_proj.weight", "model.norm.weight"}
    with pytest.raises(UnsupportedModelError, match="linear_qkv.bias"):
        megatron_to_hf({**sd, "decoder.layers.0.self_attention.linear_qkv.bias": torch.zeros(128)}, shape)
    with pytest.raises(UnsupportedModelError, match=r"linear_fc1.weight has shape \(192, 64\), the config implies \(256, 64\)"):
        megatron_to_hf(sd, dataclasses.replace(shape, ffn_hidden_size=128))
    with pytest.raises(UnsupportedModelError, match="q_layernorm.weight"):
        megatron_to_hf(sd, dataclasses.replace(shape, qk_layernorm=True))
    model.config.add_qkv_bias = True
    model.config.normalization = "LayerNorm"
    with pytest.raises(UnsupportedModelError, match="normalization='LayerNorm'.*add_qkv_bias=True"):
        check_megatron_model(model, cfg.model.rotary_base)
    model.config.add_qkv_bias, model.config.normalization = False, "RMSNorm"
    check_megatron_model(model, cfg.model.rotary_base)
    with pytest.raises(UnsupportedModelError, match="rotary_base=500"):
        check_megatron_model(model, 500)


def test_qkv_split_is_megatron_group_layout():
    """split_qkv reads megatron's per-group [q heads; k; v] rows and merge_qkv inverts it."""
    heads, groups, hd, hidden = 4, 2, 3, 5
    rows = torch.arange((heads + 2 * groups) * hd, dtype=torch.float32)[:, None].expand(-1, hidden)
    q, k, v = split_qkv(rows, heads, groups, hd)
    # group 0 = rows 0..11: q heads 0,1 (rows 0-5), k (6-8), v (9-11); group 1 = rows 12..23
    assert q[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert k[:, 0].tolist() == [6, 7, 8, 18, 19, 20] and v[:, 0].tolist() == [9, 10, 11, 21, 22, 23]
    assert torch.equal(merge_qkv(q, k, v, heads, groups, hd), rows)


def test_gpt2_and_null_tokenizer_forms(tmp_path):
    """A GPT2BPETokenizer's HF form encodes as it does; a NullTokenizer has none (reported, not faked)."""
    import json as _json

    from transformers import AutoTokenizer

    from megatron_dataeff.data.tokenizers import build_tokenizer
    from megatron_dataeff.export.hf_tokenizer import _bytes_to_unicode, save_hf_tokenizer

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({"Ġt": 256, "<|endoftext|>": 257})
    (tmp_path / "vocab.json").write_text(_json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                           merge_file=str(tmp_path / "merges.txt"))
    assert ours.tokenizer_type == "GPT2BPETokenizer"
    assert save_hf_tokenizer(ours.metadata(), str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "a tiny test ✓"
    assert hf(text).input_ids == ours.tokenize(text) and 256 in ours.tokenize(text)
    assert hf.decode(ours.tokenize(text)) == text and hf.eos_token_id == ours.eod == 257
    assert save_hf_tokenizer({"tokenizer_type": "NullTokenizer", "vocab_size": 10}, str(tmp_path / "n")) is False


def test_export_without_hf_tokenizer_says_so(megatron_cpu, tmp_path, capsys):
    """A NullTokenizer run exports its model; config.json and one printed line say there is no tokenizer."""
    from megatron_dataeff.data.tokenizers import NullTokenizer
    from tools.export_hf import main

    ckpt = make_checkpoint(tmp_path / "ckpt", ["--objective", "ar"], tokenizer=NullTokenizer(256))
    assert main(["--load", ckpt, "--output", str(tmp_path / "hf")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "NullTokenizer has no Hugging Face form" in lines[0]
    record = json.load(open(tmp_path / "hf" / "config.json"))["megatron_dataeff"]["tokenizer"]
    assert record["hf_tokenizer"] is False and not (tmp_path / "hf" / "tokenizer.json").exists()
