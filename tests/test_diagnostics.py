"""The noise-sensitivity diagnostic (paper App. B.3): the pure metrics on hand-built score
arrays with known answers, the data construction, and the model-running part on fake models
whose scores are known exactly."""

import math

import numpy as np
import pytest
import torch

from ranktuner_kernels.analysis import noise_metric as dg


# ----------------------------------------------------------------------------- K and top-K

def test_top_k_count_is_an_exact_ceiling():
    assert dg.top_k_count(30, 0.1) == 3       # 0.1 * 30 = 3.0000000000000004 in floats
    assert dg.top_k_count(1000, 0.1) == 100
    assert dg.top_k_count(31, 0.1) == 4
    assert dg.top_k_count(5, 0.1) == 1
    assert dg.top_k_count(0, 0.1) == 0
    with pytest.raises(ValueError):
        dg.top_k_count(10, 0.0)


def test_top_fraction_without_ties():
    m = dg.top_fraction([0.1, 5.0, 3.0, -1.0, 4.0], 2)
    np.testing.assert_array_equal(m, [0, 1, 0, 0, 1])


def test_top_fraction_ties_expected_and_first():
    s = [2.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # K = 3: the 2.0 is in; the four tied 1.0 share the 2 remaining slots
    np.testing.assert_allclose(dg.top_fraction(s, 3), [1, 0.5, 0.5, 0.5, 0.5, 0])
    np.testing.assert_array_equal(dg.top_fraction(s, 3, ties="first"), [1, 1, 1, 0, 0, 0])
    assert dg.top_fraction(s, 3).sum() == 3
    with pytest.raises(ValueError):
        dg.top_fraction([1.0, float("nan")], 1)
    with pytest.raises(ValueError):
        dg.top_fraction(s, 3, ties="random")


# ----------------------------------------------------------------------------- token precision / recall

def test_token_precision_recall_known_answer():
    # 20 tokens, K = ceil(0.1 * 20) = 2; noise at 0, 2, 7; top-2 by score are 0 and 1
    scores = np.zeros(20)
    scores[[0, 1, 2]] = [9.0, 8.0, 7.0]
    noise = np.zeros(20, dtype=bool)
    noise[[0, 2, 7]] = True
    prec, rec = dg.token_precision_recall(scores, noise, rho=0.1)
    assert prec == pytest.approx(1 / 2)
    assert rec == pytest.approx(1 / 3)
    # rho = 0.15: K = 3 takes 0, 1, 2 -> 2 noise
    prec, rec = dg.token_precision_recall(scores, noise, rho=0.15)
    assert (prec, rec) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_token_precision_recall_with_ties():
    # 10 tokens, K = 1; three tokens tie at the top, one of them noise: expected 1/3 hit
    scores = [5, 5, 5, 0, 0, 0, 0, 0, 0, 0]
    noise = [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    prec, rec = dg.token_precision_recall(scores, noise, rho=0.1)
    assert prec == pytest.approx(1 / 3)
    assert rec == pytest.approx(1 / 6)
    prec, rec = dg.token_precision_recall(scores, noise, rho=0.1, ties="first")  # index 0 wins
    assert (prec, rec) == (0.0, 0.0)


def test_token_precision_recall_edge_cases():
    prec, rec = dg.token_precision_recall([3.0, 2.0, 1.0], [False] * 3, rho=0.5)
    assert prec == 0 and math.isnan(rec)
    with pytest.raises(ValueError):
        dg.token_precision_recall([1.0, 2.0], [True], rho=0.5)


# ----------------------------------------------------------------------------- spans and hits

def test_mid_span_rule():
    # t0 = prompt_len + floor((out_len - L) / 2)
    assert dg.mid_span(5, 10, 4) == (8, 12)
    assert dg.mid_span(5, 11, 4) == (8, 12)       # floor(7 / 2) = 3
    assert dg.mid_span(0, 9, 4) == (2, 6)
    assert dg.mid_span(3, 4, 4) == (3, 7)         # the whole response
    assert dg.mid_span(3, 2, 5) == (3, 5)         # L clipped to the response
    assert dg.mid_span(2, 6, 0) == (5, 5)


def test_sequence_hit_known_answer_and_ties():
    # N = 20 -> top ceil(2) = 2 examples
    s = np.arange(20, dtype=float)
    c = np.zeros(20, dtype=bool)
    c[[19, 5, 0]] = True
    assert dg.sequence_hit(s, c) == 1.0            # top-2 = 19, 18
    s[18] = s[19] = s[17] = 30.0                   # three tie for two slots; one corrupted
    assert dg.sequence_hit(s, c) == pytest.approx(2 / 3)
    assert dg.sequence_hit(s, c, ties="first") == 0.0  # 17 and 18 come first


def test_noise_metrics_mid_span_decides_the_hit():
    """Ten examples, one corrupted (rho = 0.1 -> the top 1 example). The clean example 1
    has a high score exactly inside its length-matched mid-span, the clean example 2 the
    same total but at the edges: 1 beats the noise, 2 does not."""
    scores, spans, lengths = [], [], []
    # example 0: corrupted, noise at response positions 4..7, score 2 there
    s0 = np.zeros(12)
    s0[4:8] = 2.0
    scores.append(s0), spans.append((4, 8)), lengths.append(4)
    # example 1: clean, out_len 10, L = 4 -> mid-span [3, 7): score 3 there
    s1 = np.zeros(10)
    s1[3:7] = 3.0
    scores.append(s1), spans.append(None), lengths.append(4)
    # example 2: clean, high scores at the edges (outside [3, 7))
    s2 = np.zeros(10)
    s2[[0, 1, 8, 9]] = 3.0
    scores.append(s2), spans.append(None), lengths.append(4)
    for _ in range(7):
        scores.append(np.zeros(10)), spans.append(None), lengths.append(4)
    r = dg.noise_metrics(scores, spans, lengths, rho=0.1)
    assert r["k_examples"] == 1
    assert r["hit"] == 0.0                          # example 1 (mean 3) outranks the noise (mean 2)
    # tokens: 102 in all, K = ceil(10.2) = 11; eight tokens score 3, the 4 noise tokens 2
    # and fill the remaining 3 slots in expectation: 3/4 each
    assert r["k_tokens"] == 11
    assert r["precision"] == pytest.approx(3 / 11)
    assert r["recall"] == pytest.approx(3 / 4)
    # without example 1's middle, the noise span is the top example
    scores[1][:] = 0.0
    r = dg.noise_metrics(scores, spans, lengths, rho=0.1)
    assert r["hit"] == 1.0 and r["hit_rate"] == 1.0


def test_noise_metrics_span_length_is_used_for_clean_examples():
    # clean example of 10 tokens with L = 2 -> mid-span [4, 6); the noise example's mean is 1
    s_noise = np.array([0, 0, 1, 1, 0, 0], dtype=float)
    s_clean = np.array([0, 0, 0, 0, 5, 5, 0, 0, 0, 0], dtype=float)
    r = dg.noise_metrics([s_noise, s_clean], [(2, 4), None], [2, 2], rho=0.5)
    assert r["hit"] == 0.0
    r = dg.noise_metrics([s_noise, s_clean], [(2, 4), None], [2, 10], rho=0.5)  # whole: mean 1, tie
    assert r["hit"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data construction

def test_first_sentence_and_midpoint_insertion():
    assert dg.first_sentence("  Aerobic exercise works. It is good.  ") == "Aerobic exercise works."
    assert dg.first_sentence("No end here") == "No end here"
    assert dg.first_sentence("Pi is 3.14 roughly! Yes.") == "Pi is 3.14 roughly!"
    # midpoint of "aa bb cc dd" (len 11) is 5.5: whitespace at 2, 5, 8 -> 5
    pre, ins, post = dg.insert_at_midpoint("aa bb cc dd", "NOISE.")
    assert (pre, ins, post) == ("aa bb", " NOISE.", " cc dd")
    # a tie (whitespace at 2 and 4, midpoint 3) takes the earlier one
    assert dg.insert_at_midpoint("xx y z", "X") == ("xx", " X", " y z")
    # no whitespace: at the end
    assert dg.insert_at_midpoint("abc", "X") == ("abc", " X", "")


def char_encode(text):
    return [ord(c) for c in text]


def test_build_examples_marks_exactly_the_inserted_tokens():
    pairs = [(f"Q{i}:", f"step one {i}. step two. answer {i}") for i in range(20)]
    noise = ["THE CAT SAT. More text.", "BIRDS SING LOUDLY! Other."]
    ex = dg.build_examples(pairs, noise, char_encode, rho=0.1, seed=3, prefix_ids=[1])
    corrupted = [e for e in ex if e.noise_span is not None]
    assert len(corrupted) == 2                      # ceil(0.1 * 20)
    for e in ex:
        resp = e.ids[e.prompt_len:]
        assert e.out_len == len(resp)
        if e.noise_span is None:
            assert e.span_len in (len(" THE CAT SAT."), len(" BIRDS SING LOUDLY!"))
        else:
            a, b = e.noise_span
            assert "".join(map(chr, resp[a:b])) in (" THE CAT SAT.", " BIRDS SING LOUDLY!")
            assert e.span_len == b - a
    # the same seed gives the same corruption
    ex2 = dg.build_examples(pairs, noise, char_encode, rho=0.1, seed=3, prefix_ids=[1])
    assert [e.ids for e in ex] == [e.ids for e in ex2]


def test_build_examples_truncation():
    pairs = [("P", "aaaa bbbb cccc dddd")]
    ex = dg.build_examples(pairs, ["NOISE HERE."], char_encode, rho=1.0, max_length=14)
    (e,) = ex
    assert len(e.ids) == 14 and e.prompt_len == 1 and e.out_len == 13
    assert e.noise_span == (9, 13) and e.span_len == 4   # " NOISE HERE." starts at 9, cut at 13


# ----------------------------------------------------------------------------- the model-running part

class Oracle(torch.nn.Module):
    """A fake causal LM over byte ids that 'knows' the next token (it reads ahead, which a
    test may do): a sharp correct prediction for lowercase/punctuation, a sharp *wrong* one
    for uppercase letters (the noise sentences are uppercase)."""

    def __init__(self, vocab=128):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        b, t = ids.shape
        logits = torch.zeros(b, t, self.vocab)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        upper = (nxt >= 65) & (nxt <= 90)
        wrong = torch.where(nxt == 120, 121, 120)          # 'x' or 'y'
        idx = torch.where(upper, wrong, nxt)
        logits.scatter_(2, idx[..., None], 12.0)
        return logits


def test_score_tokens_aligns_scores_with_response_tokens():
    ex = dg.build_examples([("q:", "ab cd")], ["ZZ."], char_encode, rho=1.0, prefix_ids=[2])
    (sc,) = dg.score_tokens(Oracle(), ex)
    resp = "".join(map(chr, ex[0].ids[ex[0].prompt_len:]))
    assert resp == "ab ZZ. cd"
    nll = sc["prob"]
    assert nll.shape == (len(resp),)
    high = [c.isupper() for c in resp]
    assert all(nll[high] > 5) and all(nll[~np.array(high)] < 0.01)
    assert all(sc["ranktuner"][high] > 1) and all(sc["ranktuner"][~np.array(high)] <= 1.0 + 1e-6)


def test_noise_sensitivity_end_to_end_with_an_oracle():
    pairs = [(f"q{i}:", "ab cd ef.") for i in range(40)]
    noise = ["NOISENOISE SENTENCEHERE.", "ANOTHERLOUD ONEHERE."]  # >= 18 uppercase letters each
    res = dg.noise_sensitivity(Oracle(), pairs, noise, char_encode, rho=0.1, seed=0, prefix_ids=[2], batch_size=7)
    assert res.n_examples == 40 and res.n_corrupted == 4
    # -log p flags exactly the uppercase noise letters; K = 10% of the tokens is fewer than them
    assert dg.top_k_count(res.n_tokens, 0.1) < 4 * 18
    prob = res.rows["prob"]
    assert prob["precision"] == pytest.approx(1.0)
    assert prob["hit"] == 4 and prob["hit_rate"] == 1.0
    table = res.table()
    for needle in ("TOK PREC@10%", "TOK REC@10%", "SEQ HIT@10%", "Entropy-dominant", "Prob-dominant", "RankTuner"):
        assert needle in table
    assert "| method |" in res.markdown()


def test_noise_sensitivity_uniform_model_is_at_chance():
    """Uniform logits: every score ties, so precision is exactly the noise share, recall is
    K / |T| / ... and the hit is its expectation."""

    def uniform(ids):
        return torch.zeros(*ids.shape, 50)

    pairs = [("p", "aaaa bbbb cccc dddd eeee")] * 30
    res = dg.noise_sensitivity(uniform, pairs, ["1234 5678."], lambda s: [ord(c) % 50 for c in s], rho=0.1)
    share = res.n_noise_tokens / res.n_tokens
    k = dg.top_k_count(res.n_tokens, 0.1)
    for key, _ in dg.METHODS:
        r = res.rows[key]
        assert r["precision"] == pytest.approx(share)
        assert r["recall"] == pytest.approx(k / res.n_tokens)
        assert r["hit"] == pytest.approx(3 * 3 / 30)   # top 3 of 30, 3 corrupted
