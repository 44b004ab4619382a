"""The data-constrained sample stream: budget, epochs, disjoint validation, determinism, position."""

import numpy as np
import pytest
import torch

from megatron_dataeff.data.corpus import embedded_corpus
from megatron_dataeff.data.samples import DataConstrainedData, split_documents
from megatron_dataeff.data.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    p = str(tmp_path_factory.mktemp("ds") / "toy_text_document")
    b = IndexedDatasetBuilder(p + ".bin", dtype=np.uint16)
    for d in range(200):  # document d holds tokens d*1000 + (0, 1, 2, ...) so tokens name their document
        n = int(rng.integers(5, 80))
        b.add_document(torch.tensor(d * 100 + np.arange(n) % 100, dtype=torch.int64), [n])
    b.finalize(p + ".idx")
    return p


def _doc_of(token):
    return int(token) // 100


def test_exact_unique_token_budget(prefix):
    """--unique-tokens N makes the training set exactly N tokens."""
    for n in (500, 1234, 3000):
        data = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=1, unique_tokens=n)
        assert data.unique_tokens == n
        assert len(data.train) == (n - 1) // 16


def test_budget_larger_than_data_is_refused(prefix):
    """Asking for more unique tokens than exist names the flag."""
    with pytest.raises(ValueError, match="--unique-tokens"):
        DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=1, unique_tokens=10**9)


def test_each_epoch_is_a_permutation_of_the_same_windows(prefix):
    """Epoch e's samples are a fresh permutation of the same windows."""
    data = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=3, unique_tokens=2000)
    n = len(data.train)
    windows = [data.train.get(k).tobytes() for k in range(n)]
    epochs = []
    for e in range(3):
        batch = data.train_batch(e * n, n)["tokens"].numpy()
        got = [row.astype(np.int64).tobytes() for row in batch]
        assert sorted(got) == sorted(w for w in windows)
        epochs.append(got)
    assert epochs[0] != epochs[1] != epochs[2]
    assert data.epoch_of(int(2.5 * n)) == pytest.approx(2.5)


def test_validation_is_disjoint_and_independent_of_budget_and_seed(prefix):
    """Validation documents are never trained on and do not move with --unique-tokens or --seed."""
    a = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=1, unique_tokens=1500)
    b = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=2)
    va = a.valid_batch(0, len(a.valid))["tokens"]
    vb = b.valid_batch(0, len(b.valid))["tokens"]
    assert torch.equal(va, vb)
    valid_docs = {_doc_of(t) for t in va.flatten()}
    train_docs = {_doc_of(t) for t in b.train_batch(0, len(b.train))["tokens"].flatten()}
    assert valid_docs and not (valid_docs & train_docs)


def test_deterministic_for_a_seed_and_position_is_one_integer(prefix):
    """Same seed, same stream; resuming at consumed_samples k continues the same stream."""
    a = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=5, unique_tokens=2000)
    b = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=5, unique_tokens=2000)
    c = DataConstrainedData(prefix, 16, [0.9, 0.1, 0], seed=6, unique_tokens=2000)
    full = a.train_batch(0, 300)["tokens"]
    assert torch.equal(full[200:], b.train_batch(200, 100)["tokens"])
    assert not torch.equal(full, c.train_batch(0, 300)["tokens"])
    assert torch.equal(a.train_batch(200, 100)["sample_index"], torch.arange(200, 300))


def test_split_is_a_partition():
    """Train, valid and test documents partition the dataset."""
    parts = split_documents(1000, [0.8, 0.15, 0.05])
    allv = np.concatenate(parts)
    assert len(allv) == 1000 and len(set(allv.tolist())) == 1000
    assert [len(p) for p in parts] == [800, 150, 50]


def test_embedded_corpus_is_real_text():
    """The embedded corpus is English text from the stdlib, tokenized into an indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = embedded_corpus(ByteTokenizer())
    ds = IndexedDataset(prefix)
    assert len(ds) > 300
    text = ByteTokenizer().detokenize(np.concatenate([ds[i] for i in range(20)]))
    assert "the" in text and "Return" in text


@pytest.fixture(scope="module")
def second_prefix(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    p = str(tmp_path_factory.mktemp("ds2") / "other_text_document")
    b = IndexedDatasetBuilder(p + ".bin", dtype=np.uint16)
    for d in range(100):  # tokens >= 50000 mark this dataset
        b.add_document(torch.tensor(50000 + np.arange(40), dtype=torch.int64), [40])
    b.finalize(p + ".idx")
    return p


def test_blend_follows_weights_and_splits_the_budget(prefix, second_prefix):
    """--data-path 0.75 A 0.25 B: every prefix of the stream is within one sample of the weights."""
    from megatron_dataeff.data.blending import build_data

    data = build_data(["0.75", prefix, "0.25", second_prefix], 16, [0.9, 0.1, 0], seed=1, unique_tokens=2000)
    assert data.unique_tokens == 2000
    assert [p.unique_tokens for p in data.parts] == [1500, 500]
    batch = data.train_batch(0, 5000)["tokens"]
    from_b = (batch[:, 0] >= 50000).numpy()
    counts = np.cumsum(from_b)
    positions = np.arange(1, 5001)
    assert np.all(np.abs(counts - 0.25 * positions) <= 1.0)
    # each dataset's share is its own epoch-permuted stream, in order
    d, i = data.locate(4999)
    assert torch.equal(torch.from_numpy(data.parts[d].train_window(i)), batch[4999])
    again = build_data(["0.75", prefix, "0.25", second_prefix], 16, [0.9, 0.1, 0], seed=1, unique_tokens=2000)
    assert torch.equal(again.train_batch(4000, 100)["tokens"], batch[4000:4100])
    valid = data.valid_batch(0, data.valid_samples)["tokens"]
    assert (valid[:, 0] >= 50000).any() and (valid[:, 0] < 50000).any()


def test_data_path_parsing_errors():
    """Malformed --data-path lists are refused with the flag named."""
    from megatron_dataeff.data.blending import parse_data_path

    assert parse_data_path(["a"]) == (["a"], [1.0])
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["0.5", "a", "b"])
    with pytest.raises(ValueError, match="not a weight"):
        parse_data_path(["x", "a", "0.5", "b"])
    with pytest.raises(ValueError, match="must be positive"):
        parse_data_path(["0", "a", "1", "b"])
