"""Each objective's corruption and loss against hand-computed small cases."""

import math

import pytest
import torch

from megatron_dataeff.config import ObjectiveConfig
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
        TokenDropoutObjective(MASK, SEED, rate=-0.1).prepare(torch.zeros(2, 5, dtype=torch.int64), idx)


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


# ----------------------------------------------------------------------------------------------
# Token-dropout corruptions: random / mixed noise, spans, an annealed rate, masked-input regularisation

from megatron_dataeff.ops.corruption import corrupt_tokens, span_mask  # noqa: E402

V = 258  # ids 0..257, the mask token last


@pytest.mark.parametrize("noise", ["random", "mixed"])
def test_random_and_mixed_noise_replace_the_dropped_positions_by_hand(noise):
    """Dropped where u_token < R (the [MASK] case's positions); random ids floor(u_id (V - 1)) shifted past the
    mask token, never the mask token; mixed: u_kind < 0.8 the mask token, < 0.9 the random id, else kept."""
    tok, idx = _tokens(6, 40) % 250, torch.tensor([3, 4, 5, 6, 7, 10**9])
    inputs = tok[:, :-1]
    out = corrupt_tokens(inputs, idx, SEED, mode="fixed", rate=0.4, noise=noise, mask_token_id=MASK, vocab_ids=V)
    dropped = philox.uniform(SEED, idx, philox.STREAM_TOKEN, 40) < torch.tensor(0.4, dtype=torch.float32)
    assert torch.equal(out.mask, dropped)
    rand = (philox.uniform(SEED, idx, philox.STREAM_NOISE_ID, 40).double() * (V - 1)).floor().long()
    rand = rand + (rand >= MASK).long()
    if noise == "random":
        expect = torch.where(dropped, rand, inputs)
    else:
        kind = philox.uniform(SEED, idx, philox.STREAM_NOISE_KIND, 40)
        expect = torch.where(dropped, torch.where(kind < 0.8, torch.tensor(MASK),
                                                  torch.where(kind < 0.9, rand, inputs)), inputs)
    assert torch.equal(out.input_ids, expect)
    assert (rand != MASK).all() and int(rand.max()) < V


def test_mixed_noise_is_eighty_ten_ten():
    """Over many dropped positions: about 80% become the mask token, 10% a random id, 10% stay."""
    tok = torch.full((400, 256), 7, dtype=torch.int64)
    out = corrupt_tokens(tok, torch.arange(400), SEED, mode="fixed", rate=0.5, noise="mixed", mask_token_id=MASK,
                         vocab_ids=V)
    ids = out.input_ids[out.mask]
    kept = (ids == 7).float().mean().item()  # a random id is 7 with probability 1/257
    assert abs((ids == MASK).float().mean().item() - 0.8) < 0.01 and abs(kept - 0.1) < 0.01


def _naive_span_chain(u, p, span):
    out = torch.zeros(u.shape, dtype=torch.bool)
    for i in range(u.shape[0]):
        pi = float(p[i])
        run = max(span, pi / (1 - pi)) if pi < 1 else float("inf")
        leave = torch.tensor(0.0 if run == float("inf") else 1 / run, dtype=torch.float64).float()
        enter = torch.tensor(1.0 if run == float("inf") else min(1.0, pi / (run * (1 - pi))),
                             dtype=torch.float64).float()
        state = bool(u[i, 0] < p[i])
        out[i, 0] = state
        for j in range(1, u.shape[1]):
            state = bool(u[i, j] >= leave) if state else bool(u[i, j] < enter)
            out[i, j] = state
    return out


@pytest.mark.parametrize("span", [1.0, 2.5, 12.0])
def test_span_chain_vectorised_equals_the_step_by_step_chain(span):
    """span_mask (vectorised) is the Markov chain of ops/corruption.py position by position, rates 0 and 1 included."""
    g = torch.Generator().manual_seed(int(span * 10))
    u, p = torch.rand(40, 150, generator=g), torch.rand(40, generator=g)
    p[0], p[1], p[2] = 0.0, 1.0, 0.97
    assert torch.equal(span_mask(u, p, span), _naive_span_chain(u, p, span))
    assert not span_mask(u, p, span)[0].any() and span_mask(u, p, span)[1].all()


def test_spans_keep_the_rate_and_have_the_mean_length():
    """Geometric spans of mean 5 at rate 0.3: 30% of positions dropped, dropped runs 5 long on average."""
    tok = torch.zeros(2000, 512, dtype=torch.int64)
    out = corrupt_tokens(tok, torch.arange(2000), SEED, mode="fixed", rate=0.3, span=5.0, mask_token_id=MASK,
                         vocab_ids=V)
    m = out.mask.long()
    runs = ((m[:, 1:] == 1) & (m[:, :-1] == 0)).sum() + m[:, 0].sum()
    assert abs(m.float().mean().item() - 0.3) < 0.005 and abs(m.sum().item() / runs.item() - 5.0) < 0.1
    assert torch.equal(out.input_ids, torch.where(out.mask, torch.tensor(MASK), tok))


@pytest.mark.parametrize("anneal", ["linear", "cosine"])
def test_annealed_rate_follows_the_step_of_the_samples(anneal):
    """The rate goes from R at step 0 to the final rate at the last step; a micro-batch takes the rate of its
    global batch (sample index // global batch) and one spanning two steps is refused."""
    obj = TokenDropoutObjective(MASK, SEED, rate=0.6, anneal=anneal, final_rate=0.1, train_iters=11,
                                global_batch_size=4)
    assert obj.rate_at(0) == pytest.approx(0.6) and obj.rate_at(10) == pytest.approx(0.1)
    assert obj.rate_at(5) == pytest.approx(0.35)  # the midpoint of both shapes
    assert anneal == "linear" or obj.rate_at(2) == pytest.approx(0.6 - 0.5 * (1 - math.cos(math.pi * 0.2)) / 2)
    tok = _tokens(4, 64)
    got = obj.prepare(tok, torch.arange(20, 24))  # step 5
    ref = TokenDropoutObjective(MASK, SEED, rate=obj.rate_at(5)).prepare(tok, torch.arange(20, 24))
    assert torch.equal(got.input_ids, ref.input_ids)
    with pytest.raises(ValueError, match="spans training steps"):
        obj.prepare(tok, torch.arange(18, 22))


def test_masked_input_regularisation_adds_the_corrupted_rows_loss():
    """MIR: rows [clean; corrupted], labels clean twice; loss = (clean CE sum + W x corrupted CE sum) / (b s);
    the parts report each half per token; evaluation is the clean batch alone."""
    tok, idx = _tokens(3, 16), torch.tensor([0, 1, 2])
    obj = TokenDropoutObjective(MASK, SEED, rate=0.5, aux_weight=0.3)
    ob = obj.prepare(tok, idx)
    ocfg = ObjectiveConfig(token_dropout_rate=0.5, token_dropout_aux_weight=0.3)
    assert obj.rows_per_sample(ocfg) == 2 and ob.input_ids.shape == (6, 16) and ob.num_tokens == 48
    assert torch.equal(ob.input_ids[:3], tok[:, :-1])
    corrupted = TokenDropoutObjective(MASK, SEED, rate=0.5).prepare(tok, idx).input_ids
    assert torch.equal(ob.input_ids[3:], corrupted) and torch.equal(ob.labels, torch.cat([tok[:, 1:]] * 2))
    ce = torch.rand(6, 16, dtype=torch.float64)
    loss_sum, n = obj.loss(ce, ob)
    assert loss_sum.item() == pytest.approx((ce[:3].sum() + 0.3 * ce[3:].sum()).item(), rel=1e-6) and n == 48
    parts = obj.loss_parts(ce, ob)
    assert parts["clean"][0].item() == pytest.approx(ce[:3].sum().item(), rel=1e-6) and parts["clean"][1] == 48
    assert parts["corrupted"][0].item() == pytest.approx(ce[3:].sum().item(), rel=1e-6)
    assert obj.prepare(tok, idx, evaluation=True).input_ids.shape == (3, 16)


# ----------------------------------------------------------------------------------------------
# The dual objective

from megatron_dataeff.objectives import DualObjective  # noqa: E402


def test_dual_rows_are_the_ar_and_mdm_batches_of_their_samples():
    """Each sample is AR iff uniform(seed, sample, STREAM_OBJECTIVE) < A: its row is then the AR batch's row
    (causal attention mask), else the masked-diffusion batch's (no mask); parts split the loss by kind."""
    tok, idx = _tokens(8, 16), torch.arange(100, 108)
    obj = DualObjective(MASK, SEED, ar_fraction=0.5)
    ob = obj.prepare(tok, idx)
    ar = philox.uniform(SEED, idx, philox.STREAM_OBJECTIVE, 1)[:, 0] < 0.5
    assert torch.equal(obj.is_ar(idx), ar) and 0 < int(ar.sum()) < 8
    a = AutoregressiveObjective(MASK, SEED).prepare(tok, idx)
    m = MaskedDiffusionObjective(MASK, SEED).prepare(tok, idx)
    for name in ("input_ids", "labels", "loss_weight"):
        want = torch.where(ar[:, None], getattr(a, name), getattr(m, name))
        assert torch.equal(getattr(ob, name), want), name
    assert torch.equal(ob.attention_mask[:, 0], torch.ones(16, 16, dtype=torch.bool).triu(1) & ar[:, None, None])
    ce = torch.rand(8, 16, dtype=torch.float64)
    parts = obj.loss_parts(ce, ob)
    assert parts["ar"][1] == int(ar.sum()) * 16 and parts["mdm"][1] == int((~ar).sum()) * 16
    assert parts["ar"][0].item() + parts["mdm"][0].item() == pytest.approx(obj.loss(ce, ob)[0].item(), rel=1e-6)


def test_dual_fraction_and_views():
    """About A of the samples are AR; the ar view is every row AR with a causal mask, the mdm view every row
    masked diffusion (its Monte-Carlo copies as mdm's), and the mixed batch is not a validation batch."""
    obj = DualObjective(MASK, SEED, ar_fraction=0.3)
    assert abs(obj.is_ar(torch.arange(20000)).float().mean().item() - 0.3) < 0.01
    tok, idx = _tokens(3, 16), torch.tensor([4, 5, 6])
    ar = obj.view("ar").prepare(tok, idx, evaluation=True)
    assert torch.equal(ar.input_ids, tok[:, :-1]) and ar.attention_mask.all(dim=0)[0].equal(
        torch.ones(16, 16, dtype=torch.bool).triu(1))
    mdm = obj.view("mdm").prepare_evaluation(tok, idx, 4)
    want = MaskedDiffusionObjective(MASK, SEED).prepare_evaluation(tok, idx, 4)
    assert torch.equal(mdm.input_ids, want.input_ids) and not mdm.attention_mask.any()
    assert obj.view("mdm").monte_carlo and not obj.view("ar").monte_carlo
    with pytest.raises(ValueError, match="validates each view"):
        obj.prepare(tok, idx, evaluation=True)


@pytest.mark.parametrize("kind", ["mdm", "dual", "block"])
def test_clipped_schedule_trains_inside_it_and_validates_on_the_whole(kind):
    """--mdm-t-min / --mdm-t-max: training rates p = (t_max - t_min) t + t_min for mdm's t (weights 1/p), every one
    inside [t_min, t_max); validation batches are those of the unclipped objective bit for bit (the ELBO)."""
    from megatron_dataeff.objectives.block import BlockDiffusionObjective
    from megatron_dataeff.objectives.dual import DualObjective

    def make(**kw):
        return {"mdm": lambda: MaskedDiffusionObjective(MASK, SEED, **kw),
                "dual": lambda: DualObjective(MASK, SEED, ar_fraction=0.25, **kw),
                "block": lambda: BlockDiffusionObjective(MASK, SEED, 4, **kw)}[kind]()

    tok = torch.randint(0, 50, (64, 17), dtype=torch.int64)
    idx = torch.arange(64) + 1000
    clipped, plain = make(t_min=0.3, t_max=0.8), make()
    ob = clipped.prepare(tok, idx)
    w = ob.loss_weight[:, :16][ob.mask[:, :16]]
    assert w.numel() > 0 and bool(((1 / w) >= 0.3 - 1e-6).all()) and bool(((1 / w) < 0.8).all())
    if kind == "mdm":  # the rate itself, as the kernels compute it
        t = philox.uniform(SEED, idx, philox.STREAM_RATE, 1)[:, 0].double()
        p = ((0.8 - 0.3) * t + 0.3).float()
        assert torch.equal(ob.mask, philox.uniform(SEED, idx, philox.STREAM_TOKEN, 16) < p[:, None])
    assert not torch.equal(ob.loss_weight, plain.prepare(tok, idx).loss_weight)
    if kind == "dual":  # validated view by view: its mdm view is the mdm objective
        clipped, plain = clipped.view("mdm"), plain.view("mdm")
    a, b = clipped.prepare(tok, idx, evaluation=True), plain.prepare(tok, idx, evaluation=True)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_weight, b.loss_weight)
    assert "clipped schedule" in make(t_min=0.3, t_max=0.8).describe() and "clipped" not in make().describe()


def test_clipped_schedule_kernel_equals_reference_and_default_is_unchanged():
    """The kernels take the schedule's top as `rate` in mdm mode: equal to the reference for a clipped one, and
    rate 1 is the unclipped (1 - eps) t + eps; eps >= rate is refused by name."""
    tok = torch.randint(0, 50, (7, 33), dtype=torch.int64)
    idx = torch.arange(7) * 31
    a = mask_tokens(tok, idx, SEED, mode="mdm", eps=0.2, rate=0.6, mask_token_id=MASK)
    b = mask_tokens_reference(tok, idx, SEED, mode="mdm", eps=0.2, rate=0.6, mask_token_id=MASK)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.weight, b.weight)
    assert bool((a.rate >= 0.2).all()) and bool((a.rate < 0.6).all())
    t = philox.uniform(SEED, idx, philox.STREAM_RATE, 1)[:, 0].double()
    assert torch.equal(mask_tokens(tok, idx, SEED, mode="mdm", eps=1e-3, mask_token_id=MASK).rate,
                       ((1 - 1e-3) * t + 1e-3).float())
    with pytest.raises(ValueError, match="eps 0.6 must be below rate 0.6"):
        mask_tokens(tok, idx, SEED, mode="mdm", eps=0.6, rate=0.6, mask_token_id=MASK)


def test_clipped_schedule_flags_are_checked():
    """The flags name themselves when out of order, and are refused for objectives without masked diffusion."""
    from megatron_dataeff.config import ConfigError

    ObjectiveConfig(name="mdm", mdm_t_min=0.3, mdm_t_max=0.8).validate()
    with pytest.raises(ConfigError, match="--mdm-t-min"):
        ObjectiveConfig(name="mdm", mdm_t_min=0.8, mdm_t_max=0.3).validate()
    with pytest.raises(ConfigError, match="not ar's"):
        ObjectiveConfig(name="ar", mdm_t_max=0.5).validate()
