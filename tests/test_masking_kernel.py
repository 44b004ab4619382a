"""The fused token-masking kernel (csrc/) against the torch reference, bit for bit, and its statistics."""

import contextlib
import math
import zlib

import pytest
import torch

from megatron_dataeff.ops import extension, philox
from megatron_dataeff.ops.masking import mask_tokens, mask_tokens_reference

from tests.conftest import KERNEL, KERNEL_DEVICES as DEVICES

SEED = 0x1234_5678_9ABC  # uses both key words
# (eps, stratify_group, stream_offset, mask_token_id) variants checked inside each case
VARIANTS = [(1e-3, 0, 0, 3), (0.0, 4, 0, 50257), (0.5, 3, philox.EVAL_STREAM_OFFSET, 0), (0.999, 1, 7, 1)]


def _indices(batch, gen):
    """Sample indices with both 32-bit words in use, some small, in no particular order."""
    small = torch.randint(0, 1000, (batch,), generator=gen)
    big = torch.randint(0, 2**40, (batch,), generator=gen) + 2**33
    return torch.where(torch.arange(batch) % 2 == 0, small, big)


@contextlib.contextmanager
def _kernel(device):
    """Within the block mask_tokens runs the compiled kernel of `device`, asserted: never the reference."""
    with extension.force_reference(False):
        impl = extension.implementation(device)
        assert impl == KERNEL[device], (f"{device} tensors run {impl!r}, not the {KERNEL[device]!r} kernel: "
                                        f"{extension.load_error(device)}")
        yield


def _assert_same(out, ref, device):
    assert out.input_ids.dtype == ref.input_ids.dtype and out.input_ids.device.type == device
    for name in ("input_ids", "mask", "weight", "rate"):
        a, b = getattr(out, name).cpu(), getattr(ref, name).cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rate", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("mode", ["mdm", "fixed", "uniform"])
@pytest.mark.parametrize("shape", [(1, 1), (0, 5), (3, 0), (3, 1), (1, 64), (5, 131), (2, 1000)])
def test_kernel_matches_reference(shape, mode, rate, dtype, device):
    """mask_tokens on the kernel equals mask_tokens_reference exactly: ids, mask, weights, rates."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, mode, rate)).encode()))
    tokens = torch.randint(0, 50000, shape, generator=gen).to(dtype)
    index = _indices(shape[0], gen)
    for eps, group, offset, mask_id in VARIANTS:
        if mode == "mdm" and rate <= eps:  # mdm's rate is its schedule's top (1, or a clipped one): above eps
            continue
        kw = dict(mode=mode, mask_token_id=mask_id, rate=rate, eps=eps, stratify_group=group, stream_offset=offset)
        ref = mask_tokens_reference(tokens, index, SEED, **kw)
        with _kernel(device):
            out = mask_tokens(tokens.to(device), index.to(device), SEED, **kw)
        _assert_same(out, ref, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_many_samples_stratified(device):
    """Rates of 4096 samples with large indices and every stratification group size agree exactly."""
    gen = torch.Generator().manual_seed(0)
    index = torch.cat([torch.arange(2048), torch.randint(0, 2**62, (2048,), generator=gen)])
    tokens = torch.zeros(4096, 3, dtype=torch.int64)
    for group in (0, 1, 2, 3, 7, 64, 1000):
        for mode in ("mdm", "uniform"):
            kw = dict(mode=mode, mask_token_id=9, rate=0.8, eps=1e-3, stratify_group=group)
            ref = mask_tokens_reference(tokens, index, SEED, **kw)
            with _kernel(device):
                out = mask_tokens(tokens.to(device), index.to(device), SEED, **kw)
            _assert_same(out, ref, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_non_contiguous_tokens(device):
    """A non-contiguous token view is accepted and gives the reference's result."""
    tokens = torch.arange(2 * 7 * 2, dtype=torch.int64).reshape(2, 14)[:, ::2]
    index = torch.tensor([5, 6])
    ref = mask_tokens_reference(tokens, index, SEED, mode="fixed", rate=0.5, mask_token_id=1)
    with _kernel(device):
        out = mask_tokens(tokens.to(device), index.to(device), SEED, mode="fixed", rate=0.5, mask_token_id=1)
    _assert_same(out, ref, device)


@pytest.mark.parametrize("force", [False, True])
def test_invalid_inputs_raise(force):
    """Wrong dtypes, rates outside [0, 1], negative indices and bad modes/offsets raise on every implementation."""
    tok = torch.zeros(2, 5, dtype=torch.int64)
    idx = torch.tensor([0, 1])
    with extension.force_reference(force):
        assert extension.implementation("cpu") == ("torch" if force else KERNEL["cpu"])
        with pytest.raises(TypeError):
            mask_tokens(tok.float(), idx, SEED, mode="mdm", mask_token_id=1)
        with pytest.raises(TypeError):
            mask_tokens(tok, idx.int(), SEED, mode="mdm", mask_token_id=1)
        for bad in (dict(rate=1.5), dict(rate=-0.1), dict(eps=1.0), dict(mask_token_id=-1),
                    dict(stratify_group=-1), dict(stream_offset=-1), dict(mode="bogus")):
            kw = dict(mode="fixed", mask_token_id=1, rate=0.5) | bad
            with pytest.raises(ValueError):
                mask_tokens(tok, idx, SEED, **kw)
        with pytest.raises(ValueError):
            mask_tokens(tok, torch.tensor([0, -1]), SEED, mode="fixed", rate=0.5, mask_token_id=1)
        with pytest.raises(ValueError):
            mask_tokens(tok, idx, -1, mode="fixed", rate=0.5, mask_token_id=1)


def test_force_reference_switch():
    """force_reference() makes every device use the torch reference, and restores the previous choice."""
    before = extension.implementation("cpu")
    with extension.force_reference():
        assert extension.implementation("cpu") == "torch" and extension.IMPLEMENTATION == "torch"
    assert extension.implementation("cpu") == before
    assert before == ("cpp" if extension.cpu_module() is not None and not extension.forced() else "torch")
    with extension.force_reference(False):
        assert extension.implementation("cpu") == "cpp", extension.load_error("cpu")


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.93])
def test_masked_fraction_matches_rate(rate):
    """The masked count of each sample is Binomial(seq, p): within 5 standard deviations; weights are 1/p."""
    seq = 20000
    out = mask_tokens(torch.zeros(6, seq, dtype=torch.int64), torch.arange(6) * 77, SEED, mode="fixed", rate=rate,
                      mask_token_id=1)
    sd = math.sqrt(seq * rate * (1 - rate))
    for k in out.mask.sum(dim=1).tolist():
        assert abs(k - seq * rate) <= 5 * sd
    assert torch.equal(out.weight[out.mask], torch.full_like(out.weight[out.mask], 1.0 / torch.tensor(rate).item()))
    assert torch.equal(out.input_ids == 1, out.mask) and (out.weight[~out.mask] == 0).all()


@pytest.mark.parametrize("group", [0, 16])
def test_mdm_rates_are_uniform(group):
    """With eps = 0 the per-sample rate t is U(0, 1) (Kolmogorov-Smirnov), stratified or not."""
    stats = pytest.importorskip("scipy.stats")
    out = mask_tokens(torch.zeros(4000, 1, dtype=torch.int64), torch.arange(4000) + 10**6, SEED, mode="mdm",
                      eps=0.0, mask_token_id=1, stratify_group=group)
    assert stats.kstest(out.rate.double().numpy(), "uniform").pvalue > 1e-3
    if group:  # exactly one rate per stratum [k/G, (k+1)/G) in each group of G consecutive indices
        strata = (out.rate.double() * group).floor().long().reshape(-1, group)
        assert torch.equal(strata.sort(dim=1).values, torch.arange(group).expand_as(strata))
