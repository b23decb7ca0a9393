"""n, intervals and paired tests (quantlab.evaluation.noise) and output fidelity (quantlab.evaluation.fidelity),
each against a value computed independently here."""
import math

import pytest
import torch

from quantlab.evaluation.fidelity import FidelityAccumulator, compare_outputs
from quantlab.evaluation.noise import (
    MCNEMAR,
    PAIRED_T,
    WILSON,
    SampleScores,
    mcnemar_exact,
    metric_noise,
    paired_t_test,
    t_interval,
    t_quantile,
    wilson_interval,
)


def test_wilson_interval_of_90_of_100_is_the_textbook_value():
    low, high = wilson_interval(90, 100)
    # The textbook value (e.g. Newcombe 1998, z = 1.96): 0.8256 to 0.9448.
    assert low == pytest.approx(0.8256, abs=5e-5) and high == pytest.approx(0.9448, abs=5e-5)
    # Independently: the Wilson bounds are the p0 where the score test sits exactly at z.
    for p0 in (low, high):
        assert abs(0.9 - p0) / math.sqrt(p0 * (1 - p0) / 100) == pytest.approx(1.959963984540054, rel=1e-9)


def test_wilson_interval_edges_stay_inside_0_1():
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and 0.96 < low < 0.97
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_is_the_two_sided_binomial_on_discordant_pairs():
    # 1 vs 5 discordant samples: p = 2 * (C(6,0) + C(6,1)) / 2^6.
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (math.comb(6, 0) + math.comb(6, 1)) / 2 ** 6)
    assert mcnemar_exact(5, 1) == mcnemar_exact(1, 5)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # A large count (log-space sum) agrees with exact integer arithmetic.
    exact = 2 * sum(math.comb(300, i) for i in range(121)) / 2 ** 300
    assert mcnemar_exact(120, 180) == pytest.approx(exact, rel=1e-9)


def test_t_quantiles_match_closed_forms():
    # df = 1 (Cauchy): t_p = tan(pi (p - 1/2)); df = 2: t_p = (2p - 1) sqrt(2 / (4 p (1 - p))).
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), rel=1e-9)
    assert t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)  # the t table


def test_t_interval_and_paired_t_test_by_hand():
    values = [1.0, 2.0, 3.0]  # mean 2, sd 1, df 2
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) / math.sqrt(3)
    low, high = t_interval(values)
    assert low == pytest.approx(2 - half, rel=1e-9) and high == pytest.approx(2 + half, rel=1e-9)
    # Differences (1, 1, 4): mean 2, sd sqrt(3), t = 2 / (sqrt(3) / sqrt(3)) = 2 with df 2: p = 1 - 2 / sqrt(6).
    assert paired_t_test([2.0, 3.0, 7.0], [1.0, 2.0, 3.0]) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-9)
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_metric_noise_marks_differences_inside_the_noise():
    reference = SampleScores("proportion", [1.0] * 95 + [0.0] * 5)
    close = SampleScores("proportion", [1.0] * 93 + [0.0] * 7)  # 2 samples flipped: McNemar p = 0.5
    noise = metric_noise(close, reference)
    assert noise.n == 100 and noise.ci_method == WILSON and noise.paired_test == MCNEMAR
    low, high = wilson_interval(93, 100)
    assert (noise.ci_low, noise.ci_high) == pytest.approx((100 * low, 100 * high))
    assert noise.p_value == pytest.approx(0.5) and noise.within_noise is True
    far = SampleScores("proportion", [1.0] * 60 + [0.0] * 40)
    assert metric_noise(far, reference).within_noise is False
    assert metric_noise(close).p_value is None and metric_noise(close).within_noise is None  # FP32 itself: no test
    nll = SampleScores("exp_mean", [1.0, 2.0, 3.0], unit="tokens")
    perplexity = metric_noise(nll, SampleScores("exp_mean", [1.0, 2.0, 3.0], unit="tokens"))
    assert (perplexity.ci_low, perplexity.ci_high) == pytest.approx(tuple(math.exp(v) for v in t_interval([1.0, 2.0, 3.0])))
    assert perplexity.paired_test == f"{PAIRED_T}, over tokens" and perplexity.within_noise is True


def test_output_fidelity_by_hand():
    reference = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    output = torch.tensor([[1.5, 0.0, -1.0], [0.0, 1.0, 2.0]])
    f = compare_outputs(output, reference)
    assert f.n == 2 and f.max_abs_error == 2.0
    assert f.max_rel_error == 1.0  # |0 - 2| / |2| (the zero reference element is left out)
    cos0 = (1.5 + 1.0) / (math.sqrt(1.5 ** 2 + 1) * math.sqrt(2))
    cos1 = 1.0 / (math.sqrt(5) * math.sqrt(5))
    assert f.mean_cosine == pytest.approx((cos0 + cos1) / 2) and f.one_minus_cosine == pytest.approx(1 - (cos0 + cos1) / 2)
    assert f.top1_agreement == 50.0  # row 0: argmax 0 both; row 1: 0 vs 2

    def kl(p_logits, q_logits):
        p = [math.exp(v) / sum(math.exp(u) for u in p_logits) for v in p_logits]
        q = [math.exp(v) / sum(math.exp(u) for u in q_logits) for v in q_logits]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = (kl([1, 0, -1], [1.5, 0, -1]) + kl([2, 1, 0], [0, 1, 2])) / 2
    assert f.kl_divergence == pytest.approx(expected, rel=1e-9)
    # Batch by batch gives the same numbers as one call.
    acc = FidelityAccumulator(logits=True)
    acc.update(output[:1], reference[:1])
    acc.update(output[1:], reference[1:])
    assert acc.result().to_dict() == pytest.approx(f.to_dict())
    embedding = compare_outputs(output, reference, logits=False)
    assert embedding.kl_divergence is None and embedding.top1_agreement is None


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def test_language_model_rows_carry_token_noise_and_fidelity():
    from quantlab.evaluation.compare import compare

    model = _TinyLM()
    data = [{"input_ids": torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    result = compare(model, data, data, metric="perplexity", calibrators="max", layer_batches=0)
    rows = {(r.precision, r.metric): r for r in result.rows}
    tokens = 3 * 2 * 5  # next-token positions scored
    ppl = rows[("int8", "perplexity")]
    assert ppl.n == tokens and ppl.ci_low < ppl.value < ppl.ci_high and ppl.ci_method.endswith("over tokens")
    assert ppl.paired_test == f"{PAIRED_T}, over tokens" and isinstance(ppl.within_noise, bool)
    assert rows[("int8", "next_token_accuracy")].paired_test == f"{MCNEMAR}, over tokens"
    assert rows[("int8", "token_agreement")].p_value is None  # agreement with FP32 needs no test against FP32
    fidelity = {(f.precision, f.calibrator): f for f in result.fidelity}
    assert set(fidelity) == {("fp16", None), ("int8", "max")}
    assert fidelity[("int8", "max")].n == 6 and fidelity[("int8", "max")].top1_agreement == pytest.approx(
        rows[("int8", "token_agreement")].value, abs=100 / 6)  # agreement over all positions vs over scored tokens
    assert fidelity[("int8", "max")].kl_divergence >= 0
