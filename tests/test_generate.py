"""Generation: tools/generate.py on a checkpoint agrees with the exported HF model; the samplers'
contracts (block order, commit schedule, suppressed ids, seeding) hold."""

import json

import pytest
import torch

from megatron_dataeff.export.hf_export import export_checkpoint
from megatron_dataeff.inference.sampling import ar_generate, diffusion_generate
from tests.test_export_hf import make_checkpoint
from tools.generate import main as generate_main

PROMPT = "def f(x):"
PROMPT_IDS = list(PROMPT.encode())  # ByteTokenizer


@pytest.fixture(scope="module")
def models(megatron_cpu, tmp_path_factory):
    """name -> (checkpoint, fp32 HF export) for a Llama-like AR, a Qwen3-like AR and an mdm model."""
    flags = {"llama": ["--objective", "ar", "--num-query-groups", "2"],
             "qwen3": ["--objective", "ar", "--qk-layernorm", "--untie-embeddings-and-output-weights"],
             "mdm": ["--objective", "mdm", "--qk-layernorm", "--num-query-groups", "2"]}
    out = {}
    for i, (name, f) in enumerate(flags.items()):
        root = tmp_path_factory.mktemp(name)
        ckpt = make_checkpoint(root / "ckpt", f, seed=10 + i)
        out[name] = (ckpt, export_checkpoint(ckpt, str(root / "hf"), dtype="fp32"))
    return out


def _run_cli(capsys, *args):
    assert generate_main(list(args) + ["--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return json.loads(line)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_greedy_ar_equals_transformers_generate(models, capsys, name):
    """Greedy tools/generate.py on the checkpoint = transformers' greedy generate on the export."""
    from transformers import AutoModelForCausalLM

    ckpt, hf = models[name]
    got = _run_cli(capsys, "--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert got["token_ids"] == want[0, len(PROMPT_IDS):].tolist()
    assert len(got["token_ids"]) >= 1 and all(t < 258 and t != 257 for t in got["token_ids"])
    assert got["text"] == bytes(t for t in got["token_ids"] if t < 256).decode("utf-8", errors="replace") \
        or 256 in got["token_ids"]


def test_ar_sampling_is_seeded(models, capsys):
    """Same seed, same sample; another seed, another; top-k 1 is greedy; exported HF sampling runs."""
    from transformers import AutoModelForCausalLM

    from megatron_dataeff.inference.loading import load_model_for_inference

    ckpt, hf = models["llama"]
    model, _, _ = load_model_for_inference(ckpt)

    def fn(ids):
        return model(ids, torch.arange(ids.shape[1])[None, :], None)

    def sample(seed, **kw):
        kw = {"temperature": 1.5, "top_p": 0.95, **kw}
        return ar_generate(fn, [PROMPT_IDS], 16, generator=torch.Generator().manual_seed(seed), eos_token_id=256,
                           suppress_ids=range(257, 384), **kw)[0, len(PROMPT_IDS):].tolist()

    assert sample(3) == sample(3) and sample(3) != sample(4)
    greedy = _run_cli(capsys, "--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "16")["token_ids"]
    assert sample(4, top_k=1, top_p=None) == greedy
    hf_model = AutoModelForCausalLM.from_pretrained(hf)
    out = hf_model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=5, do_sample=True, temperature=1.0)
    assert out.shape[1] <= len(PROMPT_IDS) + 5 and out[0, len(PROMPT_IDS):].max() < 257


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_kv_cache_gives_the_full_recompute_tokens(models, capsys, name):
    """Greedy decoding with the KV cache (the default) = --no-kv-cache, on one prompt (CLI) and on a
    batch of two (seeded sampling too); each step's logits agree to reduction order."""
    from megatron_dataeff.inference.kv_cache import KVCacheLogits
    from megatron_dataeff.inference.loading import load_model_for_inference

    ckpt, _ = models[name]
    args = ["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "40"]
    cached = _run_cli(capsys, *args)["token_ids"]
    assert cached == _run_cli(capsys, *args, "--no-kv-cache")["token_ids"] and len(cached) == 40

    model, _, _ = load_model_for_inference(ckpt)
    steps = []

    def full(ids):
        logits = model(ids, torch.arange(ids.shape[1])[None, :].expand(ids.shape[0], -1), None)
        steps.append(logits[:, -1].clone())  # ar_generate bans ids in place
        return logits

    cache = KVCacheLogits(model, max_length=len(PROMPT_IDS) + 24)

    def incremental(ids):
        logits = cache(ids)
        assert logits.shape[1] == 1
        steps.append(logits[:, -1].clone())  # ar_generate bans ids in place
        return logits

    prompts = torch.tensor([PROMPT_IDS, list(b"for i in:")])  # same length, no padding
    for kw in ({}, {"temperature": 1.0, "top_k": 50}):
        steps.clear()
        runs = [ar_generate(fn, prompts, 24, generator=torch.Generator().manual_seed(2), suppress_ids=range(257, 384),
                            **kw) for fn in (full, incremental)]
        assert torch.equal(runs[0], runs[1])
        err = max((a - b).abs().max().item() for a, b in zip(steps[:24], steps[24:]))
        print(f"kv cache {name} {kw}: max abs logit difference {err:.2e}")
        assert err <= 1e-4


def test_kv_cache_restarts_on_new_ids_and_refuses_misuse(models):
    """Ids that do not extend the cached ones start a new cache; too long a sequence, a model in
    training mode and a bidirectional (mdm) model are refused."""
    from megatron_dataeff.inference.kv_cache import KVCacheLogits
    from megatron_dataeff.inference.loading import load_model_for_inference

    model, _, _ = load_model_for_inference(models["llama"][0])
    cache = KVCacheLogits(model, max_length=12)
    ids = torch.tensor([PROMPT_IDS])
    def last(x):
        return model(x, torch.arange(x.shape[1])[None, :], None)[:, -1:]

    first = cache(ids)
    longer = torch.cat([ids, torch.tensor([[65]])], dim=1)
    assert (cache(longer) - last(longer)).abs().max() <= 1e-4  # extends the cache
    other = torch.tensor([list(b"import os")])
    assert (cache(other) - last(other)).abs().max() <= 1e-4  # another prompt: not the cached one
    assert (cache(ids) - first).abs().max() <= 1e-4  # a shorter sequence: starts over
    with pytest.raises(ValueError, match="max_length 12"):
        cache(torch.zeros(1, 13, dtype=torch.long))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        cache(ids)
    mdm, _, _ = load_model_for_inference(models["mdm"][0])
    with pytest.raises(ValueError, match="causal"):
        KVCacheLogits(mdm, max_length=12)


@pytest.mark.parametrize("temperature", ["0", "1.0"])
def test_diffusion_cli_equals_exported_generate(models, capsys, temperature):
    """tools/generate.py on the mdm checkpoint = the exported model's `generate`, same seed."""
    from transformers import AutoModel

    ckpt, hf = models["mdm"]
    got = _run_cli(capsys, "--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "16", "--block-length", "8",
                   "--steps", "8", "--temperature", temperature, "--seed", "5")
    model = AutoModel.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32)
    out = model.generate(torch.tensor([PROMPT_IDS]), gen_length=16, block_length=8, steps=8,
                         temperature=float(temperature), seed=5)
    assert out[0, :len(PROMPT_IDS)].tolist() == PROMPT_IDS
    assert got["token_ids"] == out[0, len(PROMPT_IDS):].tolist()
    assert len(got["token_ids"]) == 16 and all(t < 257 for t in got["token_ids"])  # no [MASK], no padding
    if temperature != "0":
        other = model.generate(torch.tensor([PROMPT_IDS]), gen_length=16, block_length=8, steps=8,
                               temperature=1.0, seed=6)
        assert other[0, len(PROMPT_IDS):].tolist() != got["token_ids"]


def test_cli_prints_text(models, capsys):
    """Without --json the generated text is printed."""
    ckpt, _ = models["mdm"]
    assert generate_main(["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


MASK, VOCAB = 9, 12


def _fake_logits(calls):
    """Favours the mask token and id 11 (both banned), then id = position % 8; confidence grows to the right."""
    def fn(x):
        calls.append(x.clone())
        b, s = x.shape
        logits = torch.zeros(b, s, VOCAB)
        pos = torch.arange(s, dtype=torch.float32)
        logits[:, torch.arange(s), torch.arange(s) % 8] = 1.0 + pos
        logits[..., MASK] = logits[..., 11] = 100.0
        return logits
    return fn


def test_diffusion_sampler_fills_blocks_left_to_right_most_confident_first():
    """Block 2 stays masked until block 1 is done; each step commits its share of tokens, the most
    confident ones first; banned ids (mask, suppressed) are never committed."""
    calls = []
    prompt = torch.tensor([[1, 2]])
    out = diffusion_generate(_fake_logits(calls), prompt, gen_length=8, block_length=4, steps=4,
                             mask_token_id=MASK, suppress_ids=[11])
    assert len(calls) == 4
    masked = [(c[0] == MASK).tolist() for c in calls]
    # step 1: all 8 masked; 2 tokens a step, right-most (most confident) of block 1 first
    assert masked[0] == [False] * 2 + [True] * 8
    assert masked[1] == [False] * 2 + [True, True, False, False] + [True] * 4
    assert masked[2] == [False] * 6 + [True] * 4
    assert masked[3] == [False] * 6 + [True, True, False, False]
    assert out[0].tolist() == [1, 2] + [p % 8 for p in range(2, 10)]


def test_diffusion_sampler_rejects_bad_schedules_and_is_seeded():
    """Non-dividing block/step counts raise naming them; sampling with a seed is reproducible."""
    fn = _fake_logits([])
    with pytest.raises(ValueError, match="block_length 3"):
        diffusion_generate(fn, [1], gen_length=8, block_length=3, steps=8, mask_token_id=MASK)
    with pytest.raises(ValueError, match="steps 3"):
        diffusion_generate(fn, [1], gen_length=8, block_length=4, steps=3, mask_token_id=MASK)

    def noisy(x):
        return torch.randn(x.shape[0], x.shape[1], VOCAB, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return diffusion_generate(noisy, [1], 8, 4, 8, temperature=2.0, mask_token_id=MASK,
                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert not (run(1) == MASK).any()


def test_ar_sampler_stops_at_eos_and_suppresses():
    """Rows stop at EOS (padded with it); suppressed ids are never produced; top-p keeps the head."""
    def fn(x):
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB)
        logits[..., 5] = 10.0  # banned below
        logits[..., 3] = 5.0
        logits[0, :, 7] = 6.0 if x.shape[1] >= 3 else 0.0  # row 0 reaches EOS (7) after one token
        return logits
    out = ar_generate(fn, torch.tensor([[1, 1], [1, 1]]), 4, eos_token_id=7, suppress_ids=[5])
    assert out.tolist() == [[1, 1, 3, 7, 7, 7], [1, 1, 3, 3, 3, 3]]
    gen = torch.Generator().manual_seed(0)
    out = ar_generate(fn, torch.tensor([[1, 1]]), 3, temperature=1.0, top_p=0.5, generator=gen, suppress_ids=[5])
    assert out[0, 2].item() == 3 and out[0, 3].item() == 7
