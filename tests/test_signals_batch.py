"""A batch of reports validated in one vectorised pass decides each report exactly as
validate_report decides it alone: the same error (field and message), or the same arrays."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer.signals import (
    MAX_LOSS,
    MAX_REPORT_SAMPLES,
    MAX_TOKENS,
    PER_DOMAIN_FIELDS,
    PER_SAMPLE_FIELDS,
    SignalError,
    validate_report,
    validate_reports,
)
from mixer.v1 import mixer_pb2 as pb
from mixer.wire import report_from_proto, reports_from_protos

K = 4

# Values at and around every bound the checks draw, and the ones they refuse.
FLOATS = [
    0.0,
    1.0,
    2.5,
    -1.0,
    -0.0,
    float("nan"),
    float("inf"),
    -float("inf"),
    MAX_TOKENS,
    MAX_TOKENS * 1.0000001,
    MAX_LOSS,
    MAX_LOSS * MAX_TOKENS,
    MAX_LOSS * MAX_TOKENS * 1.01,
    1e300,
]
INTS = [0, 1, 7, -1, MAX_REPORT_SAMPLES, MAX_REPORT_SAMPLES + 1, MAX_REPORT_SAMPLES // 2 + 1, (1 << 62)]


@st.composite
def signals(draw) -> pb.Signals:
    msg = pb.Signals(
        step=draw(st.sampled_from([0, 3, -1, (1 << 53) - 1, 1 << 53])),
        source=draw(st.sampled_from(["w", ""])),
        seq=draw(st.sampled_from([0, 1, -2])),
        applied_version=draw(st.sampled_from([-1, 0, -2])),
    )
    for name in PER_DOMAIN_FIELDS:
        if draw(st.booleans()):
            n = draw(st.sampled_from([K, K, K, K - 1, 0]))
            values = st.sampled_from(INTS) if name == "domain_sample_count" else st.sampled_from(FLOATS)
            getattr(msg, name).extend(draw(st.lists(values, min_size=n, max_size=n)))
    if draw(st.booleans()):
        n = draw(st.integers(0, 5))
        msg.sample_loss = np.asarray(
            draw(st.lists(st.sampled_from([0.5, 2.0, -1.0, float("nan")]), min_size=n, max_size=n)),
            dtype="<f4",
        ).tobytes()
        if draw(st.booleans()):
            msg.sample_domain = np.asarray(
                draw(st.lists(st.sampled_from([0, K - 1, K, -1]), min_size=n, max_size=n)), dtype="<i4"
            ).tobytes()
        if draw(st.booleans()):
            msg.sample_id = b"\x01" * draw(st.sampled_from([8 * n, 8 * n + 3]))
    if draw(st.booleans()):
        msg.extra["x"] = draw(st.sampled_from([1.0, float("nan")]))
    return msg


def alone(msg: pb.Signals):
    try:
        return validate_report(report_from_proto(msg), K)
    except SignalError as e:
        return e


def same(a, b) -> bool:
    if isinstance(a, SignalError) or isinstance(b, SignalError):
        return type(a) is type(b) and str(a) == str(b)
    for name in (*PER_DOMAIN_FIELDS, *PER_SAMPLE_FIELDS, "step", "source", "seq", "applied_version", "extra"):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.lists(signals(), min_size=1, max_size=12))
def test_a_batch_decides_every_report_as_validate_report_does(msgs):
    together = validate_reports(reports_from_protos(msgs), K)
    assert len(together) == len(msgs)
    for msg, got in zip(msgs, together):
        want = alone(msg)
        assert same(got, want), (msg, got, want)


def test_a_clean_batch_shares_one_matrix_per_field():
    msgs = [
        pb.Signals(
            step=s, source="w", domain_loss_sum=[1.0, 2.0, 0.0, 3.0], domain_token_count=[1.0, 1.0, 0.0, 2.0]
        )
        for s in range(5)
    ]
    out = validate_reports(reports_from_protos(msgs), K)
    assert all(not isinstance(r, SignalError) for r in out)
    assert out[0].domain_loss_sum.base is out[4].domain_loss_sum.base is not None
    assert [r.domain_token_count.tolist() for r in out] == [list(m.domain_token_count) for m in msgs]


def test_valid_reports_with_and_without_per_sample_arrays_decide_as_alone():
    """Valid headers and per-domain arrays, so every report reaches the per-sample checks: some
    carry none, others several samples (valid, or one bad value)."""
    rng = np.random.default_rng(0)
    msgs = []
    for s in range(12):
        msg = pb.Signals(
            step=s, source="w", domain_loss_sum=rng.uniform(0, 4, K).tolist(), domain_token_count=[8.0] * K
        )
        n = s % 4  # 0: a per-domain report only
        if n:
            loss = rng.uniform(0, 4, 3 * n).astype("<f4")
            if s % 5 == 4:
                loss[-1] = -1.0  # refused: sample_loss must be >= 0
            msg.sample_loss = loss.tobytes()
            msg.sample_domain = rng.integers(0, K, 3 * n).astype("<i4").tobytes()
        msgs.append(msg)
    together = validate_reports(reports_from_protos(msgs), K)
    for msg, got in zip(msgs, together, strict=True):
        assert same(got, alone(msg)), (msg, got)
    assert any(isinstance(r, SignalError) for r in together) and any(r.sample_loss is not None for r in together if not isinstance(r, SignalError))


NEAR = [0.0, -0.0, 1.0, 2.5, 7.0]
"""Clean values: batches drawn mostly from these are accepted whole by the one-matrix pass."""
EDGE = [MAX_TOKENS, MAX_TOKENS * 1.0000001, MAX_LOSS, 2 * MAX_LOSS, -MAX_LOSS, -MAX_LOSS * 1.0000001, MAX_LOSS * MAX_TOKENS, -1.0, float("nan"), float("inf")]
"""Values at and past the bounds the one-matrix pass checks (each field's range, loss over tokens)."""
EDGE_TOKENS = [0.0, 1e9, MAX_TOKENS, MAX_TOKENS * 1.0000001, -1.0, float("nan")]
"""Token counts that matter to loss over tokens: none (a positive loss there is refused), and
many in one domain (the fewest tokens, not the most, bound every loss)."""


@st.composite
def float_batches(draw) -> list[pb.Signals]:
    """Reports that share one set of float per-domain fields, mostly clean, sometimes with one value
    at or past a bound, sometimes one array of the wrong length: the batches the one-matrix pass
    clears whole, and those it must hand to the field-by-field pass."""
    names = draw(
        st.sampled_from(
            [
                ("domain_loss_sum", "domain_token_count"),
                ("domain_loss_sum", "domain_token_count", "excess_loss_sum"),
                ("domain_token_count",),
                ("alignment",),
                ("domain_loss_sum", "domain_token_count", "alignment"),
            ]
        )
    )
    msgs = []
    for s in range(draw(st.integers(1, 6))):
        msg = pb.Signals(step=s, source="w")
        for name in names:
            values = draw(st.lists(st.sampled_from(NEAR), min_size=K, max_size=K))
            if name == "domain_token_count":
                values = [v + 1.0 for v in values]  # tokens wherever there is loss
            if draw(st.integers(0, 3)) == 0:
                edges = EDGE_TOKENS if name == "domain_token_count" else EDGE
                values[draw(st.integers(0, K - 1))] = draw(st.sampled_from(edges))
            if draw(st.integers(0, 19)) == 0:
                values = values[:-1]
            getattr(msg, name).extend(values)
        msgs.append(msg)
    return msgs


@settings(max_examples=300, deadline=None)
@given(float_batches())
def test_batches_of_float_fields_near_their_bounds_decide_as_alone(msgs):
    together = validate_reports(reports_from_protos(msgs), K)
    for msg, got in zip(msgs, together, strict=True):
        want = alone(msg)
        assert same(got, want), (msg, got, want)


def test_loss_over_few_tokens_is_refused_beside_many_tokens_elsewhere():
    """One domain with many tokens must not clear a loss above MAX_LOSS per token in another (the
    one-matrix pass bounds every loss by the fewest tokens)."""
    msgs = [
        pb.Signals(step=0, source="w", domain_loss_sum=[1.0] * K, domain_token_count=[1e9] + [1.0] * (K - 1)),
        pb.Signals(step=1, source="w", domain_loss_sum=[1.0, 2 * MAX_LOSS] + [1.0] * (K - 2), domain_token_count=[1.0] * K),
    ]
    together = validate_reports(reports_from_protos(msgs), K)
    assert not isinstance(together[0], SignalError) and isinstance(together[1], SignalError)
    for msg, got in zip(msgs, together, strict=True):
        assert same(got, alone(msg)), (msg, got)
