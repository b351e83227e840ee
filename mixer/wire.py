"""Conversions between the pure core's types and the mixer.v1 wire messages (all protobuf conversion
lives here), and the one JSON form of a version."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mixer.signals import PER_DOMAIN_FIELDS, PER_SAMPLE_FIELDS, Report, SignalError, validate_report
from mixer.spec import JobSpec
from mixer.types import JobInfo, ReportAck, ServedVersion, Version
from mixer.v1 import mixer_pb2 as pb

if TYPE_CHECKING:
    from mixer.store import JobRecord


def report_to_proto(r: Report) -> pb.Signals:
    msg = pb.Signals(step=int(r.step), source=r.source, seq=int(r.seq), applied_version=int(r.applied_version))
    for name in PER_DOMAIN_FIELDS:
        arr = getattr(r, name)
        if arr is not None:
            getattr(msg, name).extend(np.asarray(arr).tolist())
    for name, dtype in PER_SAMPLE_FIELDS.items():
        arr = getattr(r, name)
        if arr is not None:
            setattr(msg, name, np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    if r.sample_topic is not None and np.ndim(r.sample_topic) == 2 and np.shape(r.sample_topic)[1] > 1:
        msg.sample_topic_width = int(np.shape(r.sample_topic)[1])
    for k, v in r.extra.items():
        msg.extra[k] = float(v)
    return msg


_DOMAIN_DTYPES = {name: np.int64 if name == "domain_sample_count" else np.float64 for name in PER_DOMAIN_FIELDS}
_SAMPLE_DTYPES = {name: (np.dtype(dtype).newbyteorder("<"), dtype) for name, dtype in PER_SAMPLE_FIELDS.items()}


def report_from_proto(msg: pb.Signals) -> Report:
    """Decode a wire report; array lengths and values are checked later by validate_report."""
    return _decode(msg, lambda name, value: np.array(value, dtype=_DOMAIN_DTYPES[name]), copy=True)


def reports_from_protos(msgs: Sequence[pb.Signals]) -> list[Report | SignalError]:
    """Decode a batch of wire reports for `validate_reports`: each report, or the SignalError that
    refuses it. Per-domain arrays stay lists (the validation stacks them into matrices);
    per-sample arrays are read-only views of the message's bytes (no copy on a little-endian
    host)."""
    out: list[Report | SignalError] = []
    for msg in msgs:
        try:
            out.append(_decode(msg, _as_list, copy=False))
        except SignalError as e:
            out.append(e)
    return out


def _as_list(name: str, value) -> list:
    return value[:]  # a list of the repeated field's values (faster than list(value))


def _decode(msg: pb.Signals, per_domain, *, copy: bool) -> Report:
    r = Report(step=msg.step, source=msg.source, seq=msg.seq, applied_version=msg.applied_version)
    for fd, value in msg.ListFields():  # only the fields the worker set
        name = fd.name
        if name in _DOMAIN_DTYPES:
            setattr(r, name, per_domain(name, value))
        elif name in _SAMPLE_DTYPES:
            dt, dtype = _SAMPLE_DTYPES[name]
            if len(value) % dt.itemsize:
                raise SignalError(name, f"is {len(value)} bytes, not a whole number of {dt.itemsize}-byte {dt.name} values")
            arr = np.frombuffer(value, dtype=dt)
            setattr(r, name, arr.astype(dtype) if copy or arr.dtype != dtype else arr)
        elif name == "extra":
            r.extra = dict(value)
    width = msg.sample_topic_width
    if width < 0 or (width > 1 and r.sample_topic is None):
        raise SignalError("sample_topic_width", f"is {width}; it must be >= 0, and > 1 only with sample_topic")
    if width > 1:
        if r.sample_topic.size % width:
            raise SignalError("sample_topic", f"has {r.sample_topic.size} ids, not a whole number of rows of {width}")
        r.sample_topic = r.sample_topic.reshape(-1, width)
    return r


def version_to_proto(job: str, v: Version, domains: list[str], created_at: float = 0.0) -> pb.WeightVersion:
    return pb.WeightVersion(
        job=job,
        version=v.version,
        effective_step=v.effective_step,
        weights=v.weights.tolist(),
        domains=domains,
        params_json=json.dumps(v.params, sort_keys=True),
        params_blob=v.blob,
        trigger_step=v.trigger_step,
        created_at=created_at,
    )


WATCH_BATCH_MAX = 256
"""WatchWeightsRequest.max_batch's upper bound, versions per message (what MixerClient asks for)."""
WATCH_BATCH_BYTES = 1 << 20
"""A WatchWeights message stops adding versions short of this size (one larger version travels alone)."""


def watch_messages(versions: list[pb.WeightVersion], per: int) -> list[pb.WatchWeightsResponse]:
    """Versions, in order, as WatchWeights messages of at most `per` versions each (`version`, then
    `more`), each short of WATCH_BATCH_BYTES unless its first version alone is larger."""
    out, i = [], 0
    while i < len(versions):
        msg = pb.WatchWeightsResponse(version=versions[i])
        size = versions[i].ByteSize()
        i += 1
        while i < len(versions) and len(msg.more) + 1 < per:
            n = versions[i].ByteSize()
            if size + n > WATCH_BATCH_BYTES:
                break
            msg.more.append(versions[i])
            size += n
            i += 1
        out.append(msg)
    return out


def served_version_from_proto(msg: pb.WeightVersion) -> ServedVersion:
    """A served version: weights as float64 in the order of `domains`, params parsed from JSON."""
    return ServedVersion(
        version=msg.version,
        effective_step=msg.effective_step,
        weights=np.array(msg.weights, dtype=np.float64),
        params=json.loads(msg.params_json) if msg.params_json else {},
        blob=msg.params_blob,
        trigger_step=msg.trigger_step,
        job=msg.job,
        domains=tuple(msg.domains),
        created_at=msg.created_at,
    )


def decode_stored(payload: bytes, num_domains: int) -> Report:
    """A report from the log, as the engine saw it when it was taken.

    Without the upper bounds (validate_report(bounded=False)): a log written before they existed
    replays, reloads and exports as it ran."""
    return validate_report(report_from_proto(pb.Signals.FromString(payload)), num_domains, bounded=False)


def job_to_proto(rec: JobRecord, spec: JobSpec | None = None, *, latest_version: int = -1, max_step: int = -1, report_count: int = 0) -> pb.Job:
    """A job's record (and its live state, where it is loaded: its newest version, step and report count)."""
    if spec is None:
        spec = JobSpec.from_json(rec.spec_json)
    return pb.Job(
        name=rec.name,
        spec_json=rec.spec_json,
        fingerprint=rec.fingerprint,
        domains=spec.domain_names,
        strategy=spec.strategy.name,
        latest_version=latest_version,
        max_step=max_step,
        report_count=report_count,
        created_at=rec.created_at,
        source_job=rec.source_job or "",
        weighting=spec.weighting.name,
        status=rec.status,
    )


def job_info_from_proto(msg: pb.Job) -> JobInfo:
    return JobInfo(
        name=msg.name,
        spec_json=msg.spec_json,
        fingerprint=msg.fingerprint,
        domains=tuple(msg.domains),
        strategy=msg.strategy,
        weighting=msg.weighting,
        latest_version=msg.latest_version,
        max_step=msg.max_step,
        report_count=msg.report_count,
        created_at=msg.created_at,
        source_job=msg.source_job,
        status=msg.status,
    )


def report_ack_from_proto(msg: pb.ReportResponse) -> ReportAck:
    a = msg.ack
    return ReportAck(
        step=a.step,
        seq=a.seq,
        source=a.source,
        duplicate=a.duplicate,
        log_seq=a.log_seq,
        latest=served_version_from_proto(msg.latest) if msg.HasField("latest") else None,
    )


SPLIT_BYTES = 16 << 10
"""Session messages at least this long keep each report's bytes as they arrived (its log
payload, a view into the message's bytes): serializing a large report again costs far more than
finding where it lies; below this size the Python that finds it costs more."""


class Undecodable:
    """A request whose bytes are not a protobuf message of the method's type (the servicer's
    lenient deserializer returns it instead of raising; gRPC would answer UNKNOWN)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


class ReceivedReports(list):
    """The reports of one Session message (`report` or `reports`), each with the bytes it arrived
    as: the log stores those, and parsing them again gives the same report."""

    __slots__ = ("batched", "payloads")

    def __init__(self, msgs: Sequence[pb.Signals], batched: bool, payloads: list[memoryview]):
        super().__init__(msgs)
        self.batched = batched
        self.payloads = payloads


def parse_session_request(data: bytes) -> pb.SessionRequest | ReceivedReports:
    """A Session message: the parsed SessionRequest, or for a report message of at least
    SPLIT_BYTES laid out as protobuf writes it (one field), its reports with their bytes."""
    req = pb.SessionRequest.FromString(data)
    if len(data) < SPLIT_BYTES:
        return req
    kind = req.WhichOneof("kind")
    if kind == "report":
        payloads = _fields(data, 0, len(data), _REPORT_TAG)
        msgs = [req.report]
    elif kind == "reports":
        outer = _fields(data, 0, len(data), _REPORTS_TAG)
        if outer is None or len(outer) != 1:
            return req
        start, end = _span(data)
        payloads = _fields(data, start, end, _BATCH_ITEM_TAG)
        msgs = req.reports.reports
    else:
        return req
    if payloads is None or len(payloads) != len(msgs):
        return req
    return ReceivedReports(msgs, kind == "reports", payloads)


_REPORT_TAG = 2 << 3 | 2  # SessionRequest.report, length-delimited
_REPORTS_TAG = 4 << 3 | 2  # SessionRequest.reports
_BATCH_ITEM_TAG = 1 << 3 | 2  # ReportBatch.reports


def _varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while i < end and shift < 64:
        c = data[i]
        i += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, i
        shift += 7
    raise ValueError("truncated varint")


def _span(data: bytes) -> tuple[int, int]:
    """Where the value of the message's first (length-delimited) field lies."""
    _, i = _varint(data, 0, len(data))
    n, i = _varint(data, i, len(data))
    return i, i + n


def _fields(data: bytes, i: int, end: int, tag: int) -> list[memoryview] | None:
    """The values of data[i:end] if it is nothing but length-delimited fields with this tag
    (None otherwise: the caller then serializes the parsed reports instead)."""
    out = []
    view = memoryview(data)
    try:
        while i < end:
            t, i = _varint(data, i, end)
            if t != tag:
                return None
            n, i = _varint(data, i, end)
            if i + n > end:
                return None
            out.append(view[i : i + n])
            i += n
    except ValueError:
        return None
    return out


TOPIC_TOP_K = 10
"""Topic weights are per topic (thousands): lists carry the top k, /versions/V carries them all."""


def version_json(v: Version, created_at: float, applied_step: int | None, full: bool = False) -> dict:
    """The one JSON form of a version (the HTTP API, `mixer weights --json`): `applied_step` is the
    first step a worker reported it applied (None: unknown); `full` keeps every parameter."""
    params = dict(v.params)
    out = {
        "version": v.version,
        "effective_step": v.effective_step,
        "trigger_step": v.trigger_step,
        "created_at": created_at,
        "weights": v.weights.tolist(),
        "applied_step": applied_step,
        "applied_lag_steps": None if applied_step is None else max(0, applied_step - v.effective_step),
    }
    topics = params.pop("topic_weights", None) if not full else params.get("topic_weights")
    if topics is not None:
        t = np.asarray(topics, dtype=np.float64)
        top = np.argsort(-t, kind="stable")[:TOPIC_TOP_K]
        out["num_topics"] = int(t.size)
        out["topic_weights_top"] = [[int(i), float(t[i])] for i in top]
    # Bulky parameters (a weighting model's tensors) stay out of lists; /versions/V has them all.
    out["params"] = params if full else {k: x for k, x in params.items() if not isinstance(x, (list, dict))}
    return out
