"""Philox4x32-10: Random123 known answers for the torch reference and the C++ kernel, stream layout."""

import pytest
import torch

from megatron_dataeff.ops import extension, philox

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _cpp():
    """megatron_dataeff._C, which the install builds: its absence fails the test (no silent skip)."""
    module = extension.cpu_module()
    assert module is not None, f"megatron_dataeff._C is not built: {extension.load_error('cpu')}"
    return module


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_torch_known_answers(counter, key, expected):
    """The torch reference reproduces Random123's known-answer vectors."""
    out = philox.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(o[0]) for o in out) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_cpp_known_answers(counter, key, expected):
    """The C++ kernel reproduces Random123's known-answer vectors."""
    out = _cpp().philox4x32(torch.tensor([counter], dtype=torch.int64), *key)
    assert tuple(out[0].tolist()) == expected


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_cpp_matches_torch_random_counters(n):
    """C++ and torch Philox agree on random counters and keys."""
    g = torch.Generator().manual_seed(n)
    c = torch.randint(0, 2**32, (n, 4), generator=g, dtype=torch.int64)
    key = (int(torch.randint(0, 2**32, (), generator=g)), int(torch.randint(0, 2**32, (), generator=g)))
    ref = torch.stack(philox.philox4x32(tuple(c[:, i] for i in range(4)), key), dim=1) if n else c
    assert torch.equal(_cpp().philox4x32(c, *key), ref)


def test_cpp_rejects_out_of_range_counters():
    """Counters must be uint32 values."""
    with pytest.raises(ValueError):
        _cpp().philox4x32(torch.tensor([[2**32, 0, 0, 0]]), 0, 0)


def test_stream_layout_and_uniform():
    """Element j of a stream is lane j % 4 of block j // 4; uniforms are (x >> 8) * 2**-24 in [0, 1)."""
    idx = torch.tensor([3, 2**40 + 5])
    x = philox.uint32_stream(42, idx, philox.STREAM_TOKEN, 10)
    for row, i in enumerate(idx.tolist()):
        for j in (0, 5, 9):
            words = philox.philox4x32((j // 4, i & 0xFFFFFFFF, i >> 32, philox.STREAM_TOKEN), philox.seed_key(42))
            assert int(x[row, j]) == int(words[j % 4])
    u = philox.to_uniform(torch.tensor([0, 255, 256, 2**32 - 1]))
    assert u.tolist() == [0.0, 0.0, 2.0**-24, 1.0 - 2.0**-24]
