"""HF import: Llama / Qwen3 directories become checkpoints with the same logits; export(import(x)) = x.

Tiny random HF models are created here with `save_pretrained` (nothing is downloaded).  The Llama
directory carries a tokenizer trained here with the `tokenizers` library; the Qwen3 one has none
(the model-only path: NullTokenizer, which adds the mask token's row to the embedding).
"""

import json
import math
import os

import pytest
import torch

from megatron_dataeff.config import ConfigError
from megatron_dataeff.export.hf_export import export_checkpoint
from megatron_dataeff.export.hf_import import choose_vocab_padding, import_hf
from megatron_dataeff.export.hf_mapping import UnsupportedModelError, read_hf_config
from megatron_dataeff.checkpoint.format import read_metadata
from tests.test_export_hf import TOL, make_checkpoint, megatron_logits

WORDS = "the cat sat on the mat and a dog ran to the big red house while birds sang songs"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_((0.5 if "embed" in name else p.shape[1] ** -0.5) * torch.randn(p.shape, generator=gen))
    return model


def _make_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None, eos_token_id=1)
    model = _randomize(LlamaForCausalLM(cfg), 3).eval()
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return model


def _make_qwen3(path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=True)
    model = _randomize(Qwen3ForCausalLM(cfg), 4).eval()
    model.save_pretrained(path)
    return model


TOKENS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def round_trips(megatron_cpu, tmp_path_factory):
    """name -> (original HF model, HF dir, imported checkpoint, re-exported HF dir)."""
    out = {}
    for name, make in (("llama", _make_llama), ("qwen3", _make_qwen3)):
        root = tmp_path_factory.mktemp(name)
        model = make(str(root / "hf"))
        ckpt = import_hf(str(root / "hf"), str(root / "ckpt"))
        out[name] = (model, str(root / "hf"), ckpt, export_checkpoint(ckpt, str(root / "hf2"), dtype="fp32"))
    return out


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_import_then_export_reproduces_logits(round_trips, name):
    """The imported megatron model and the re-exported HF model give the original HF logits."""
    from transformers import AutoModelForCausalLM

    model, _, ckpt, hf2 = round_trips[name]
    with torch.no_grad():
        want = model(TOKENS).logits
        again = AutoModelForCausalLM.from_pretrained(hf2, dtype=torch.float32)(TOKENS).logits
    mlog = megatron_logits(ckpt, TOKENS)
    err_import = (mlog[..., :128] - want).abs().max().item()
    err_round = (again[..., :128] - want).abs().max().item()
    print(f"{name}: import max abs logit error {err_import:.2e}, export(import) {err_round:.2e}")
    assert err_import <= TOL and err_round <= TOL


def test_llama_round_trip_is_exact(round_trips):
    """With a tokenizer that fits the HF vocabulary, export(import(x)) has x's tensors, bit for bit."""
    from safetensors.torch import load_file

    model, hf, _, hf2 = round_trips["llama"]
    a, b = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(hf2, "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.load(open(os.path.join(hf2, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 128
    assert cfg["rope_theta"] == 500000.0 and cfg["num_key_value_heads"] == 2


def test_imported_metadata(round_trips):
    """megatron_dataeff.json has the training keys, model_only, iteration 0 and the HF tokenizer."""
    from megatron_dataeff.data.tokenizers import tokenizer_from_metadata

    _, hf, ckpt, _ = round_trips["llama"]
    meta = read_metadata(ckpt)
    assert {"iteration", "consumed_samples", "epoch", "scheduler", "config", "tokenizer", "mask_token_id",
            "vocab_ids", "unique_tokens", "world_size"} <= set(meta)
    assert meta["model_only"] is True and meta["iteration"] == 0
    assert open(os.path.join(os.path.dirname(ckpt), "latest_checkpointed_iteration.txt")).read() == "0"
    assert meta["tokenizer"]["tokenizer_type"] == "HuggingFaceTokenizer"
    assert meta["config"]["data"]["tokenizer_model"] == os.path.abspath(hf)
    tok = tokenizer_from_metadata(meta["tokenizer"])
    assert tok.tokenizer_model == os.path.abspath(hf) and tok.eod == 1
    assert tok.tokenize("the cat sat") == _tiny_tokenizer()("the cat sat").input_ids
    assert meta["mask_token_id"] == tok.vocab_size and meta["vocab_ids"] == tok.vocab_size + 1
    m = meta["config"]["model"]
    assert (m["rotary_base"], m["norm_epsilon"], m["num_query_groups"]) == (500000, 1e-5, 2)
    assert m["untie_embeddings_and_output_weights"] is True and m["make_vocab_size_divisible_by"] == 128
    q = read_metadata(round_trips["qwen3"][2])
    assert q["tokenizer"]["tokenizer_type"] == "NullTokenizer" and q["vocab_ids"] == 129
    assert q["config"]["model"]["qk_layernorm"] is True and q["config"]["model"]["kv_channels"] == 32
    exported = json.load(open(os.path.join(round_trips["qwen3"][3], "config.json")))["megatron_dataeff"]
    assert exported["tokenizer"]["tokenizer_type"] == "NullTokenizer" and exported["tokenizer"]["hf_tokenizer"] is False
    assert not os.path.exists(os.path.join(round_trips["qwen3"][3], "tokenizer.json"))


def test_mdm_export_import_round_trip(megatron_cpu, tmp_path):
    """Our diffusion export imports back as an mdm checkpoint (ByteTokenizer restored) with its logits."""
    from tools.import_hf import main

    ckpt = make_checkpoint(tmp_path / "ckpt", ["--objective", "mdm", "--qk-layernorm", "--num-query-groups", "2"])
    hf = export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="fp32")
    assert main(["--hf-dir", hf, "--save", str(tmp_path / "ckpt2"), "--tensor-model-parallel-size", "2"]) == 0
    meta = read_metadata(str(tmp_path / "ckpt2" / "iter_0000000"))
    assert meta["config"]["objective"]["name"] == "mdm"
    assert meta["tokenizer"]["tokenizer_type"] == "ByteTokenizer" and meta["mask_token_id"] == 257
    tokens = torch.randint(0, 258, (1, 16), generator=torch.Generator().manual_seed(0))
    err = (megatron_logits(str(tmp_path / "ckpt2"), tokens) - megatron_logits(ckpt, tokens)).abs().max().item()
    assert err == 0.0


def test_import_refuses_what_it_cannot_represent(megatron_cpu, round_trips, tmp_path, capsys):
    """Unsupported HF options and impossible target layouts fail before anything is written, named."""
    from tools.import_hf import main

    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "vocab_size": 128}
    with pytest.raises(UnsupportedModelError, match="attention_bias=true"):
        read_hf_config({**base, "attention_bias": True})
    with pytest.raises(UnsupportedModelError, match="rope_type='llama3'"):
        read_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        read_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="model_type 'mistral'"):
        read_hf_config({**base, "model_type": "mistral"})
    _, hf, _, _ = round_trips["llama"]
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 3"):
        import_hf(hf, str(tmp_path / "bad"), tensor_model_parallel_size=3)
    assert not (tmp_path / "bad").exists()
    assert main(["--hf-dir", str(tmp_path), "--save", str(tmp_path / "bad")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_vocab_padding_choice():
    """The HF rows are kept exactly when the ids in use fit; otherwise rows are added, TP-divisible."""
    assert choose_vocab_padding(129, 256, 1) == (128, 256)
    assert choose_vocab_padding(151670, 151936, 2) == (151936, 151936)  # Qwen3's tokenizer in its rows
    assert choose_vocab_padding(129, 128, 1) == (128, 256)
    assert choose_vocab_padding(50, 100, 3) == (384, 384)


def test_continue_pretraining_an_imported_model_as_diffusion(round_trips, tmp_path):
    """An imported Llama trains on (AR -> masked-diffusion adaptation) with --use-checkpoint-args."""
    from tests.conftest import run_pretrain

    ckpt = round_trips["llama"][2]
    recs = run_pretrain(["--load", str(ckpt), "--use-checkpoint-args", "--objective", "mdm", "--train-iters", "3",
                         "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1",
                         "--eval-iters", "1", "--lr", "1e-4"], tmp_path / "adapt")
    train = [r for r in recs if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train)
    run = json.loads((tmp_path / "adapt" / "run.json").read_text())
    assert run["config"]["model"]["hidden_size"] == 64 and run["tokenizer"]["tokenizer_type"] == "HuggingFaceTokenizer"


def test_safetensors_files_round_trip_with_the_library(tmp_path):
    """Our shard writer and reader agree with the safetensors library both ways (every dtype, an empty and a
    0-d tensor, several shards with an index)."""
    from safetensors.torch import load_file, save_file

    from megatron_dataeff.export.safetensors_io import SafetensorsDirectory, write_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=gen) * 10).to(dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool)}
    tensors.update({"empty": torch.empty(0, 4), "scalar": torch.tensor(2.5)})
    save_file(tensors, str(tmp_path / "model.safetensors"))  # the library's file, read by ours
    ours = SafetensorsDirectory(str(tmp_path))
    assert ours.names == set(tensors) and all(torch.equal(ours.get(k), v) for k, v in tensors.items())
    out = tmp_path / "sharded"
    out.mkdir()
    write_safetensors(tensors, str(out), max_shard_bytes=64)  # ours, read by the library
    index = json.load(open(out / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    read = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert set(read) == set(tensors) and all(torch.equal(read[k], v) for k, v in tensors.items())
