"""Token Hidden Reward: the Triton kernel (interpreter on CPU) and the streaming torch version
against the materialised float64 oracle, the oracle against the definition written pair by
pair, and the THR-guided advantage rule on hand-made cases. Shapes stay small (N <= 48,
V <= 300): the interpreter is slow."""

import math

import pytest
import torch

from ranktuner_kernels.reference import thr as ref
from ranktuner_kernels.rl import thr_advantages, thr_guided_advantages, thr_pair_sums, token_hidden_reward
from thr_cases import DEVICE, batch_case, on_dev, rel, rows_case

triton = pytest.importorskip("triton")
from ranktuner_kernels.kernels import thr as ker  # noqa: E402


def pairwise_definition(logits, tokens, u_rows, u_group, o_rows, o_group, o_w, hidden):
    """out[j] from the definition, one (o, u) pair at a time, in float64."""
    p = torch.softmax(logits.double(), -1)
    out = []
    for j in range(u_rows.numel()):
        u = int(u_rows[j])
        total = 0.0
        for i in range(o_rows.numel()):
            if int(o_group[i]) != int(u_group[j]):
                continue
            o = int(o_rows[i])
            yo, yu = int(tokens[o]), int(tokens[u])
            s = float(yo == yu) - float(p[u, yo]) - float(p[o, yu]) + float(p[o] @ p[u])
            if hidden is not None:
                s *= float(hidden[o].double() @ hidden[u].double())
            total += float(o_w[i]) * s
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("with_hidden", [False, True], ids=["no_hidden", "hidden"])
def test_oracle_matches_definition(with_hidden):
    case = rows_case(n=12, v=30, d=5, seed=1, dtype=torch.float64)
    hid = case[-1] if with_hidden else None
    got = ref.thr_pair_sums_naive(*case[:-1], hid)
    torch.testing.assert_close(got, pairwise_definition(*case[:-1], hid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_hidden", [False, True], ids=["no_hidden", "hidden"])
def test_streaming_torch_matches_oracle(with_hidden):
    case = rows_case(seed=2, dtype=torch.float64)
    hid = case[-1] if with_hidden else None
    want = ref.thr_pair_sums_naive(*case[:-1], hid)
    torch.testing.assert_close(ref.thr_pair_sums(*case[:-1], hid, chunk=37), want, rtol=1e-12, atol=1e-10)
    got32 = ref.thr_pair_sums(case[0].float(), *case[1:-1], None if hid is None else hid.float(), chunk=64)
    assert got32.dtype == torch.float32 and rel(got32, want) < 1e-5


def test_linear_identity_without_hidden():
    """Without hidden states the sum is linear: sum_o w_o <e_o - π_o, e_u - π_u> =
    <e_u - π_u, sum_o w_o (e_o - π_o)>, an O(N·V) formula independent of the Gram matrix."""
    logits, tokens, u_rows, u_group, o_rows, o_group, o_w, _ = rows_case(seed=3, dtype=torch.float64)
    v = logits.shape[1]
    err = torch.nn.functional.one_hot(tokens, v).double() - torch.softmax(logits, -1)
    want = torch.empty(u_rows.numel(), dtype=torch.float64)
    for j in range(u_rows.numel()):
        sel = o_group == u_group[j]
        want[j] = err[u_rows[j]] @ (o_w[sel][:, None] * err[o_rows[sel]]).sum(0)
    got = ker.thr_pair_sums(*on_dev(logits.float(), *rows_case(seed=3)[1:-1])).cpu()
    torch.testing.assert_close(got.double(), want,
                               rtol=2e-5, atol=2e-5 * float(want.abs().max()))


@pytest.mark.parametrize(
    "n,v,d,groups",
    [(1, 17, 16, 1), (20, 64, 16, 1), (40, 300, 24, 2), (48, 257, 40, 5), (33, 130, 70, 3)],
    ids=str,
)
@pytest.mark.parametrize("with_hidden", [False, True], ids=["no_hidden", "hidden"])
def test_kernel_matches_oracle(n, v, d, groups, with_hidden):
    case = rows_case(n=n, v=v, d=d, groups=groups, seed=n + v)
    if n == 1:  # a single row, observed and updating
        case = (case[0], case[1], torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                torch.tensor([1.0], dtype=torch.float64), case[-1])
    dev = [x.to(DEVICE) for x in case]
    hid = dev[-1] if with_hidden else None
    got = ker.thr_pair_sums(*dev[:-1], hid)
    want = ref.thr_pair_sums_naive(case[0].double(), *case[1:-1], case[-1].double() if with_hidden else None)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel(got.cpu(), want) < 2e-5, rel(got.cpu(), want)


GPU_BLOCKS = tuple(ker.GPU_LAUNCH[k] for k in ("block_u", "block_o", "block_v", "block_d"))


@pytest.mark.parametrize("blocks", [GPU_BLOCKS, (16, 32, 16, 16)], ids=["gpu_default", "small"])
def test_kernel_block_shapes(blocks):
    """The GPU's default tiles (the interpreter uses others) and small, unequal ones."""
    case = rows_case(n=48, v=257, d=40, groups=3, seed=12)
    bu, bo, bv, bd = blocks
    got = ker.thr_pair_sums(*on_dev(*case), block_u=bu, block_o=bo, block_v=bv, block_d=bd)
    want = ref.thr_pair_sums_naive(case[0].double(), *case[1:-1], case[-1].double())
    assert rel(got.cpu(), want) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_low_precision_inputs(dtype):
    case = rows_case(n=24, v=200, d=32, seed=4)
    logits, hidden = case[0].to(dtype), case[-1].to(dtype)
    got = ker.thr_pair_sums(logits.to(DEVICE), *[x.to(DEVICE) for x in case[1:-1]], hidden.to(DEVICE))
    want = ref.thr_pair_sums_naive(logits.double(), *case[1:-1], hidden.double())  # same rounded inputs
    assert rel(got.cpu(), want) < 2e-5


def test_kernel_strided_3d_logits_and_lse():
    """[B, T, V] logits viewed through a slice (rows not mergeable): no copy, row = b·T + t."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 9, 150, generator=g).to(DEVICE)
    logits = full[:, :-1]  # [3, 8, 150], stride_b = 9·150
    n = 24
    tokens = torch.randint(0, 150, (n,), generator=g)
    u_rows, u_group = torch.arange(n), torch.arange(n) // 8
    o_rows = torch.tensor([0, 3, 8, 9, 10, 17, 23])
    o_group, o_w = o_rows // 8, torch.ones(7)
    lse, ent = [x.cpu() for x in ker.row_lse_entropy(logits)]
    flat = logits.reshape(n, 150).double().cpu()
    torch.testing.assert_close(lse.double(), torch.logsumexp(flat, -1), rtol=1e-6, atol=1e-6)
    p = torch.softmax(flat, -1)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)
    got = ker.thr_pair_sums(logits, *on_dev(tokens, u_rows, u_group, o_rows, o_group, o_w), lse=lse.to(DEVICE)).cpu()
    want = ref.thr_pair_sums_naive(flat, tokens, u_rows, u_group, o_rows, o_group, o_w)
    assert rel(got, want) < 2e-5


def test_kernel_masked_vocabulary_and_tf32_option():
    case = list(rows_case(n=20, v=100, d=16, seed=6))
    case[0][:, 90:] = -float("inf")  # masked vocabulary entries (tokens are sampled below 90)
    case[1] = case[1] % 90
    want = ref.thr_pair_sums_naive(case[0].double(), *case[1:-1], case[-1].double())
    for precision in ("ieee", "tf32"):
        got = ker.thr_pair_sums(*[x.to(DEVICE) for x in case[:-1]], case[-1].to(DEVICE), precision=precision)
        assert torch.isfinite(got).all()
        assert rel(got.cpu(), want) < (2e-5 if precision == "ieee" or DEVICE == "cpu" else 5e-3)
    with pytest.raises(ValueError):
        ker.thr_pair_sums(*case[:-1], precision="fp8")


@pytest.mark.parametrize("normalize", ["none", "length"])
@pytest.mark.parametrize("with_hidden", [False, True], ids=["no_hidden", "hidden"])
def test_token_hidden_reward_definition(normalize, with_hidden):
    """THR_u = sign(u)·sum over the kept tokens o of the correct responses of u's group of
    w_o·<e_o - π_o, e_u - π_u>(·h_o·h_u), written out here per token pair."""
    logits, tokens, correct, group, hidden = batch_case(seed=7, dtype=torch.float64)
    b, t, v = logits.shape
    hid = hidden if with_hidden else None
    p = torch.softmax(logits, -1)
    lengths = (tokens != -100).sum(1)
    want = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for k in range(t):
            if tokens[i, k] == -100:
                continue
            total = 0.0
            for j in range(b):
                if not correct[j] or group[j] != group[i]:
                    continue
                for l in range(t):
                    if tokens[j, l] == -100:
                        continue
                    yo, yu = int(tokens[j, l]), int(tokens[i, k])
                    s = float(yo == yu) - float(p[i, k, yo]) - float(p[j, l, yu]) + float(p[j, l] @ p[i, k])
                    if with_hidden:
                        s *= float(hidden[j, l] @ hidden[i, k])
                    total += s / (float(lengths[j]) if normalize == "length" else 1.0)
            want[i, k] = total if correct[i] else -total
    for impl in ("naive", "reference"):
        got = token_hidden_reward(logits, tokens, correct, group, hidden=hid, normalize=normalize, impl=impl)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    hid32 = None if hid is None else hid.float().to(DEVICE)
    got = token_hidden_reward(*on_dev(logits.float(), tokens, correct, group), hidden=hid32, normalize=normalize,
                              impl="triton").cpu()
    assert rel(got.double(), want) < 2e-5


def test_token_hidden_reward_groups_and_masks():
    logits, tokens, correct, group, hidden = batch_case(seed=8)
    mask = torch.ones(6, 7)
    mask[1, :3] = 0
    thr = token_hidden_reward(*on_dev(logits, tokens, correct, group), mask=mask.to(DEVICE), hidden=hidden.to(DEVICE),
                              impl="triton").cpu()
    assert (thr[tokens == -100] == 0).all() and (thr[1, :3] == 0).all()
    # groups are independent: the second group alone gives the same numbers
    alone = token_hidden_reward(logits[3:], tokens[3:], correct[3:], group[3:], mask=mask[3:], hidden=hidden[3:],
                                impl="reference")
    torch.testing.assert_close(thr[3:], alone, rtol=1e-5, atol=1e-5)
    # no correct response: THR 0
    none = token_hidden_reward(logits, tokens, torch.zeros(6, dtype=torch.bool), group, impl="reference")
    assert (none == 0).all()
    # self-influence: a lone correct response's tokens include <e-π, e-π>·|h|² > 0 terms
    solo = token_hidden_reward(logits[:1, :1], tokens[:1, :1], torch.tensor([True]), hidden=hidden[:1, :1],
                               impl="naive")
    p = torch.softmax(logits[0, 0].double(), -1)
    e = torch.nn.functional.one_hot(tokens[0, 0], 60).double()
    torch.testing.assert_close(solo[0, 0].double(), ((e - p) @ (e - p)) * (hidden[0, 0].double() @ hidden[0, 0].double()),
                               rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    logits, tokens, correct, group, hidden = batch_case()
    with pytest.raises(ValueError):
        token_hidden_reward(logits[0], tokens[0], correct, group)
    with pytest.raises(ValueError):
        token_hidden_reward(logits, tokens[:, :-1], correct, group)
    bad = tokens.clone()
    bad[0, 0] = 60
    with pytest.raises(ValueError):
        token_hidden_reward(logits, bad, correct, group)
    with pytest.raises(ValueError):
        token_hidden_reward(logits, tokens, correct, group, normalize="mean")
    with pytest.raises(ValueError):
        token_hidden_reward(logits, tokens, correct, group, impl="cuda")
    with pytest.raises(TypeError):
        token_hidden_reward(logits.double(), tokens, correct, group, impl="triton")
    with pytest.raises(ValueError):
        thr_pair_sums(logits.reshape(-1, 60), tokens.reshape(-1).clamp_min(0), torch.arange(3), torch.zeros(3),
                      torch.arange(2), torch.zeros(2), torch.ones(3), impl="reference")


# --- the THR-guided advantage rule -------------------------------------------------------

def rule_case():
    """Two groups of two responses of three tokens; group 1 has no correct response."""
    thr = torch.tensor([[5.0, 1.0, 3.0],    # group 0, correct: mean 3
                        [-4.0, 0.5, 2.5],   # group 0, wrong
                        [9.0, -9.0, 0.0],   # group 1, wrong
                        [1.0, 1.0, 1.0]])   # group 1, wrong
    correct = torch.tensor([True, False, False, False])
    group = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return thr, correct, group, adv


@pytest.mark.parametrize("p", [0.0, 0.2, -0.1])
def test_rule_nthr_tau_and_signs(p):
    thr, correct, group, adv = rule_case()
    out, info = thr_advantages(adv, thr, correct, group, p=p)
    # tau (group 0) = min over correct responses of their mean THR = 3; |THR| > 3 kept
    assert info["tau"][0] == 3.0 and info["tau"][1] == 3.0 and math.isnan(info["tau"][2])
    want0 = torch.tensor([[1.0 * (1 + p), 0.0, 0.0], [-1.0 * (1 - p), 0.0, 0.0]])
    torch.testing.assert_close(out[:2], want0)
    torch.testing.assert_close(out[2:], adv[2:, None].expand(2, 3))  # no correct response: unchanged
    assert info["high_thr"][:2].sum() == 2 and not info["active"][2:].any()
    assert math.isclose(float(info["kept_frac"]), 2 / 6, rel_tol=1e-6)


def test_rule_beta_float_tau_keep_low():
    thr, correct, group, adv = rule_case()
    out, _ = thr_advantages(adv, thr, correct, group, p=0.5, beta=0.5)  # tau = 1.5
    torch.testing.assert_close(out[0], torch.tensor([1.5, 0.0, 1.5]))
    torch.testing.assert_close(out[1], torch.tensor([-0.5, 0.0, -1.5]))
    out, info = thr_advantages(adv, thr, correct, group, p=0.5, tau=0.75)
    torch.testing.assert_close(out[1], torch.tensor([-0.5, 0.0, -1.5]))
    assert (info["tau"][:2] == 0.75).all()
    out, _ = thr_advantages(adv, thr, correct, group, p=0.5, keep_low=True)
    torch.testing.assert_close(out[0], torch.tensor([1.5, 1.0, 1.0]))
    out, _ = thr_advantages(adv, thr, correct, group, p=0.0, tau=-1.0)  # every token high, p = 0: identity
    torch.testing.assert_close(out, adv[:, None].expand(4, 3))


def test_rule_high_entropy_inclusion():
    thr, correct, group, adv = rule_case()
    entropy = torch.tensor([[0.1, 0.9, 0.2],
                            [5.0, 0.3, 0.8],
                            [9.0, 9.0, 9.0],
                            [9.0, 9.0, 9.0]])
    mask = torch.ones(4, 3)
    out, info = thr_advantages(adv, thr, correct, group, mask=mask, p=0.2, entropy=entropy, entropy_top=0.5)
    # active pool = group 0's six tokens; top 50% entropies = {5.0, 0.9, 0.8}; 5.0 is already high-THR
    assert info["high_entropy"][0].tolist() == [False, True, False]
    assert info["high_entropy"][1].tolist() == [False, False, True]
    torch.testing.assert_close(out[0], torch.tensor([1.2, 1.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([-0.8, 0.0, -1.0]))


def test_rule_bad_arguments():
    thr, correct, group, adv = rule_case()
    with pytest.raises(ValueError):
        thr_advantages(adv, thr, correct, group, p=2.0)
    with pytest.raises(ValueError):
        thr_advantages(adv, thr, correct, group, tau="median")
    with pytest.raises(ValueError):
        thr_advantages(adv[:3], thr, correct, group)
    with pytest.raises(ValueError):
        thr_advantages(adv, thr, correct, group, entropy_top=1.5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_guided_one_call_equals_two_steps(impl):
    logits, tokens, correct, group, hidden = batch_case(seed=9)
    adv = torch.tensor([1.0, -1.0, 1.0, -0.7, -0.7, 1.4])
    d = DEVICE if impl == "triton" else "cpu"
    out, info = thr_guided_advantages(*[x.to(d) for x in (logits, tokens, adv, correct, group)], hidden=hidden.to(d),
                                      p=0.1, impl=impl)
    out, info = out.cpu(), {k: v.cpu() for k, v in info.items()}
    keep = tokens != -100
    thr = token_hidden_reward(logits, tokens, correct, group, hidden=hidden, impl="naive")
    assert rel(info["thr"].double(), thr.double()) < 2e-5
    lp = torch.log_softmax(logits.double(), -1)
    ent = torch.where(keep, -(lp.exp() * lp).sum(-1), 0.0)
    torch.testing.assert_close(info["entropy"].double(), ent, rtol=1e-5, atol=1e-5)
    want, _ = thr_advantages(adv, info["thr"], correct, group, mask=keep, p=0.1, entropy=info["entropy"])
    torch.testing.assert_close(out, want)
    assert (out[keep] != 0).any() and (out[keep] == 0).any()  # dominant-token selection happened


@pytest.mark.parametrize("shape", ["column", "row"])
def test_correct_of_another_shape_is_refused(shape):
    """``correct`` is ``[B]``: a ``[B, 1]`` column or a ``[1, B]`` row is refused, not broadcast."""
    logits, tokens, correct, group, hidden = batch_case()
    bad = correct[:, None] if shape == "column" else correct[None, :]
    with pytest.raises(ValueError, match="correct"):
        token_hidden_reward(logits, tokens, bad, group)


@pytest.mark.parametrize("tau", ["nthr", 0.0])
def test_a_group_without_a_correct_response_keeps_its_advantages(tau):
    """THR adjusts only the groups with a correct response (it sums over them): a group of wrong
    responses keeps its advantages, also with a fixed ``tau`` (no group minimum to go by)."""
    g = torch.Generator().manual_seed(4)
    adv, thr = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    correct = torch.tensor([True, False, False, False])
    group = torch.tensor([0, 0, 1, 1])
    out, info = thr_advantages(adv, thr, correct, group, p=0.5, tau=tau)
    assert torch.equal(out[2:], adv[2:]) and not info["active"][2:].any()
    assert info["active"][:2].all() and not torch.equal(out[:2], adv[:2])
