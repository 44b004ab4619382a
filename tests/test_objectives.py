"""Each objective's corruption and loss against hand-computed small cases."""

import math

import pytest
import torch

from megatron_dataeff.objectives import (AutoregressiveObjective, MaskedDiffusionObjective,
                                         TokenDropoutObjective)
from megatron_dataeff.ops import philox
from megatron_dataeff.ops.masking import mask_tokens, mask_tokens_reference

MASK = 99
SEED = 7


def _tokens(b=3, s=9):
    return torch.arange(b * (s + 1), dtype=torch.int64).reshape(b, s + 1) % 50


def test_ar_shifts_and_weights_every_position():
    """AR: input tokens[:-1], labels tokens[1:], weight 1 everywhere, normaliser = all positions."""
    tok = _tokens()
    ob = AutoregressiveObjective(MASK, SEED).prepare(tok, torch.arange(3))
    assert torch.equal(ob.input_ids, tok[:, :-1]) and torch.equal(ob.labels, tok[:, 1:])
    assert torch.all(ob.loss_weight == 1) and ob.num_tokens == 27
    ce = torch.rand(3, 9)
    loss_sum, n = AutoregressiveObjective(MASK, SEED).loss(ce, ob)
    assert n == 27 and torch.allclose(loss_sum, ce.sum())


def test_token_dropout_fixed_masks_where_uniform_below_rate():
    """Fixed token dropout masks exactly the positions whose per-sample uniform is < R; labels clean."""
    tok = _tokens()
    idx = torch.tensor([5, 6, 1000])
    obj = TokenDropoutObjective(MASK, SEED, rate=0.3, schedule="fixed")
    ob = obj.prepare(tok, idx)
    u = philox.uniform(SEED, idx, philox.STREAM_TOKEN, 9)
    expect = u < torch.tensor(0.3, dtype=torch.float32)
    assert torch.equal(ob.mask, expect)
    assert torch.equal(ob.input_ids, torch.where(expect, torch.tensor(MASK), tok[:, :-1]))
    assert torch.equal(ob.labels, tok[:, 1:]) and torch.all(ob.loss_weight == 1)
    # evaluation sees clean input
    assert torch.equal(obj.prepare(tok, idx, evaluation=True).input_ids, tok[:, :-1])


def test_token_dropout_uniform_rate_is_r_times_u():
    """Uniform schedule: p = R * u_rate per sample, masks where the token uniform < p."""
    tok = _tokens(4, 33)
    idx = torch.arange(10, 14)
    ob = TokenDropoutObjective(MASK, SEED, rate=0.5, schedule="uniform").prepare(tok, idx)
    u_rate = philox.uniform(SEED, idx, philox.STREAM_RATE, 1)[:, 0]
    p = (0.5 * u_rate.double()).float()
    u = philox.uniform(SEED, idx, philox.STREAM_TOKEN, 33)
    assert torch.equal(ob.mask, u < p[:, None])


def test_mdm_weights_are_inverse_rate_on_masked_and_normalised_by_all_tokens():
    """mdm: p = (1-eps) t + eps, weight 1/p on masked positions only, loss = sum / (batch x length)."""
    tok = _tokens(2, 16)
    idx = torch.tensor([3, 4])
    eps = 1e-3
    obj = MaskedDiffusionObjective(MASK, SEED, eps=eps)
    ob = obj.prepare(tok, idx)
    t = philox.uniform(SEED, idx, philox.STREAM_RATE, 1)[:, 0].double()
    p = ((1 - eps) * t + eps).float()
    u = philox.uniform(SEED, idx, philox.STREAM_TOKEN, 16)
    mask = u < p[:, None]
    assert torch.equal(ob.mask, mask)
    assert torch.equal(ob.labels, tok[:, :-1])
    assert torch.equal(ob.input_ids, torch.where(mask, torch.tensor(MASK), tok[:, :-1]))
    expect_w = torch.where(mask, 1.0 / p[:, None], torch.zeros(()))
    assert torch.equal(ob.loss_weight, expect_w)
    ce = torch.full((2, 16), 2.0)
    loss_sum, n = obj.loss(ce, ob)
    assert n == 32
    assert math.isclose(float(loss_sum), float((2.0 * mask / p[:, None]).sum()), rel_tol=1e-6)


def test_mdm_hand_case_full_and_no_mask():
    """t close to 1 masks (almost) everything with weight ~1; eps sets the floor of p."""
    tok = _tokens(1, 64)
    for idx in range(200):
        m = mask_tokens(tok[:, :-1], torch.tensor([idx]), SEED, mode="mdm", eps=0.5, mask_token_id=MASK)
        assert 0.5 <= float(m.rate) <= 1.0
    m = mask_tokens(tok[:, :-1], torch.tensor([0]), SEED, mode="fixed", rate=1.0, mask_token_id=MASK)
    assert m.mask.all() and torch.all(m.input_ids == MASK)
    m = mask_tokens(tok[:, :-1], torch.tensor([0]), SEED, mode="fixed", rate=0.0, mask_token_id=MASK)
    assert not m.mask.any()


@pytest.mark.parametrize("mode", ["mdm", "fixed", "uniform"])
def test_noise_is_keyed_per_sample_not_per_batch(mode):
    """A sample's corruption is the same whatever batch or micro-batch split it arrives in."""
    tok = torch.randint(0, 50, (8, 40))
    idx = torch.arange(100, 108)
    whole = mask_tokens(tok, idx, SEED, mode=mode, rate=0.4, mask_token_id=MASK)
    for split in ([8], [4, 4], [1, 3, 2, 2]):
        parts, start = [], 0
        for n in split:
            parts.append(mask_tokens(tok[start:start + n], idx[start:start + n], SEED, mode=mode, rate=0.4,
                                     mask_token_id=MASK))
            start += n
        assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
        assert torch.equal(torch.cat([p.weight for p in parts]), whole.weight)
    # reversed order: each row follows its own index
    rev = mask_tokens(tok.flip(0), idx.flip(0), SEED, mode=mode, rate=0.4, mask_token_id=MASK)
    assert torch.equal(rev.input_ids.flip(0), whole.input_ids)


def test_noise_differs_across_samples_seeds_and_eval_stream():
    """Different sample indices, seeds and the evaluation stream give different masks."""
    tok = torch.zeros(1, 4096, dtype=torch.int64)
    a = mask_tokens(tok, torch.tensor([1]), SEED, mode="fixed", rate=0.5, mask_token_id=MASK).mask
    b = mask_tokens(tok, torch.tensor([2]), SEED, mode="fixed", rate=0.5, mask_token_id=MASK).mask
    c = mask_tokens(tok, torch.tensor([1]), SEED + 1, mode="fixed", rate=0.5, mask_token_id=MASK).mask
    d = mask_tokens(tok, torch.tensor([1]), SEED, mode="fixed", rate=0.5, mask_token_id=MASK,
                    stream_offset=philox.EVAL_STREAM_OFFSET).mask
    for other in (b, c, d):
        assert (a != other).float().mean() > 0.3


def test_stratified_t_covers_each_stratum_once():
    """Stratified mdm: the G samples of a group draw one t from each [j/G, (j+1)/G)."""
    g = 16
    idx = torch.arange(3 * g, 4 * g)
    tok = torch.zeros(g, 8, dtype=torch.int64)
    m = mask_tokens(tok, idx, SEED, mode="mdm", eps=0.0, mask_token_id=MASK, stratify_group=g)
    strata = torch.floor(m.rate.double() * g).long()
    assert sorted(strata.tolist()) == list(range(g))


def test_invalid_arguments_raise():
    """Bad dtypes, shapes and rates are refused."""
    tok = torch.zeros(2, 4, dtype=torch.int64)
    idx = torch.arange(2)
    with pytest.raises(TypeError):
        mask_tokens(tok.float(), idx, SEED, mode="mdm", mask_token_id=MASK)
    with pytest.raises(ValueError):
        mask_tokens(tok, idx, SEED, mode="fixed", rate=1.5, mask_token_id=MASK)
    with pytest.raises(ValueError):
        mask_tokens(tok, idx[:1], SEED, mode="mdm", mask_token_id=MASK)
    with pytest.raises(ValueError):
        mask_tokens(tok, idx, SEED, mode="bogus", mask_token_id=MASK)
    with pytest.raises(ValueError):
        TokenDropoutObjective(MASK, SEED, rate=-0.1)


def test_reference_matches_public_entry_point():
    """mask_tokens (whichever implementation it dispatches to) equals the torch reference."""
    tok = torch.randint(0, 50, (5, 77), dtype=torch.int32)
    idx = torch.arange(5) * 1000
    a = mask_tokens(tok, idx, SEED, mode="mdm", mask_token_id=MASK)
    b = mask_tokens_reference(tok, idx, SEED, mode="mdm", mask_token_id=MASK)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.dtype == torch.int32
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("objective", [AutoregressiveObjective(MASK, SEED),
                                       TokenDropoutObjective(MASK, SEED, rate=0.5, schedule="uniform"),
                                       MaskedDiffusionObjective(MASK, SEED, eps=1e-3, stratify_group=4)],
                         ids=["ar", "token-dropout", "mdm"])
def test_evaluation_batch_is_the_trainers_validation_batch(objective):
    """One evaluation copy is what the trainer validates on (prepare(evaluation=True)), and the per-row
    losses average to the trainer's loss sum / num_tokens."""
    tok, idx = _tokens(4, 16), torch.tensor([0, 3, 7, 1000])
    ev, tr = objective.prepare_evaluation(tok, idx, 1), objective.prepare(tok, idx, evaluation=True)
    for name in ("input_ids", "labels", "loss_weight"):
        assert torch.equal(getattr(ev, name), getattr(tr, name)), name
    ce = torch.rand(4, 16, dtype=torch.float64)
    loss_sum, n = objective.loss(ce, tr)
    assert objective.sample_losses(ce, ev).mean().item() == pytest.approx(loss_sum.item() / n, rel=1e-6)


def test_mdm_evaluation_copies_are_stratified_per_window():
    """n copies of a window are evaluation samples window * n + j with t stratified over [0, 1): one rate
    in each stratum [j/n, (j+1)/n); AR objectives refuse more than one copy."""
    obj = MaskedDiffusionObjective(MASK, SEED, eps=0.0)
    tok, idx = _tokens(2, 64), torch.tensor([5, 9])
    ev = obj.prepare_evaluation(tok, idx, 4)
    assert ev.input_ids.shape == (8, 64) and torch.equal(ev.labels, tok[:, :-1].repeat_interleave(4, 0))
    index = torch.tensor([20, 21, 22, 23, 36, 37, 38, 39])
    ref = mask_tokens_reference(tok[:, :-1].repeat_interleave(4, 0), index, SEED, mode="mdm", eps=0.0,
                                mask_token_id=MASK, stratify_group=4, stream_offset=philox.EVAL_STREAM_OFFSET)
    assert torch.equal(ev.mask, ref.mask)
    strata = torch.floor(ref.rate * 4).long().view(2, 4)
    assert torch.equal(strata, torch.arange(4).repeat(2, 1))
    with pytest.raises(ValueError, match="copies must be 1"):
        AutoregressiveObjective(MASK, SEED).prepare_evaluation(tok, idx, 2)
