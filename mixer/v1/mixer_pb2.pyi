from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Job(_message.Message):
    __slots__ = ("name", "spec_json", "fingerprint", "domains", "strategy", "latest_version", "max_step", "report_count", "created_at", "source_job", "weighting", "status")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FIELD_NUMBER: _ClassVar[int]
    REPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    fingerprint: str
    domains: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    latest_version: int
    max_step: int
    report_count: int
    created_at: float
    source_job: str
    weighting: str
    status: str
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., fingerprint: _Optional[str] = ..., domains: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., latest_version: _Optional[int] = ..., max_step: _Optional[int] = ..., report_count: _Optional[int] = ..., created_at: _Optional[float] = ..., source_job: _Optional[str] = ..., weighting: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: str
    def __init__(self, spec: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: Job
    created: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., created: bool = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class FinishJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WeightVersion(_message.Message):
    __slots__ = ("job", "version", "effective_step", "weights", "domains", "params_json", "params_blob", "trigger_step", "created_at")
    JOB_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_BLOB_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    job: str
    version: int
    effective_step: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    domains: _containers.RepeatedScalarFieldContainer[str]
    params_json: str
    params_blob: bytes
    trigger_step: int
    created_at: float
    def __init__(self, job: _Optional[str] = ..., version: _Optional[int] = ..., effective_step: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., domains: _Optional[_Iterable[str]] = ..., params_json: _Optional[str] = ..., params_blob: _Optional[bytes] = ..., trigger_step: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class Signals(_message.Message):
    __slots__ = ("step", "source", "seq", "applied_version", "domain_loss_sum", "domain_token_count", "domain_sample_count", "excess_loss_sum", "val_loss", "alignment", "sample_loss", "sample_domain", "sample_id", "sample_topic", "sample_align", "extra", "sample_topic_width")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXCESS_LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ALIGN_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TOPIC_WIDTH_FIELD_NUMBER: _ClassVar[int]
    step: int
    source: str
    seq: int
    applied_version: int
    domain_loss_sum: _containers.RepeatedScalarFieldContainer[float]
    domain_token_count: _containers.RepeatedScalarFieldContainer[float]
    domain_sample_count: _containers.RepeatedScalarFieldContainer[int]
    excess_loss_sum: _containers.RepeatedScalarFieldContainer[float]
    val_loss: _containers.RepeatedScalarFieldContainer[float]
    alignment: _containers.RepeatedScalarFieldContainer[float]
    sample_loss: bytes
    sample_domain: bytes
    sample_id: bytes
    sample_topic: bytes
    sample_align: bytes
    extra: _containers.ScalarMap[str, float]
    sample_topic_width: int
    def __init__(self, step: _Optional[int] = ..., source: _Optional[str] = ..., seq: _Optional[int] = ..., applied_version: _Optional[int] = ..., domain_loss_sum: _Optional[_Iterable[float]] = ..., domain_token_count: _Optional[_Iterable[float]] = ..., domain_sample_count: _Optional[_Iterable[int]] = ..., excess_loss_sum: _Optional[_Iterable[float]] = ..., val_loss: _Optional[_Iterable[float]] = ..., alignment: _Optional[_Iterable[float]] = ..., sample_loss: _Optional[bytes] = ..., sample_domain: _Optional[bytes] = ..., sample_id: _Optional[bytes] = ..., sample_topic: _Optional[bytes] = ..., sample_align: _Optional[bytes] = ..., extra: _Optional[_Mapping[str, float]] = ..., sample_topic_width: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("job", "source")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    job: str
    source: str
    def __init__(self, job: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ReportBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[Signals]
    def __init__(self, reports: _Optional[_Iterable[_Union[Signals, _Mapping]]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("hello", "report", "reports")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    report: Signals
    reports: ReportBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[Signals, _Mapping]] = ..., reports: _Optional[_Union[ReportBatch, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("job", "source", "last_step", "last_seq", "current", "domains", "spec_json")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    job: str
    source: str
    last_step: int
    last_seq: int
    current: WeightVersion
    domains: _containers.RepeatedScalarFieldContainer[str]
    spec_json: str
    def __init__(self, job: _Optional[str] = ..., source: _Optional[str] = ..., last_step: _Optional[int] = ..., last_seq: _Optional[int] = ..., current: _Optional[_Union[WeightVersion, _Mapping]] = ..., domains: _Optional[_Iterable[str]] = ..., spec_json: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step", "seq", "duplicate", "log_seq", "source")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LOG_SEQ_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    step: int
    seq: int
    duplicate: bool
    log_seq: int
    source: str
    def __init__(self, step: _Optional[int] = ..., seq: _Optional[int] = ..., duplicate: bool = ..., log_seq: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("step", "seq", "code", "message", "source")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    step: int
    seq: int
    code: int
    message: str
    source: str
    def __init__(self, step: _Optional[int] = ..., seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AckBatch(_message.Message):
    __slots__ = ("acks", "latest")
    ACKS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[Ack]
    latest: WeightVersion
    def __init__(self, acks: _Optional[_Iterable[_Union[Ack, _Mapping]]] = ..., latest: _Optional[_Union[WeightVersion, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("welcome", "ack", "version", "nack", "acks")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    version: WeightVersion
    nack: Nack
    acks: AckBatch
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., version: _Optional[_Union[WeightVersion, _Mapping]] = ..., nack: _Optional[_Union[Nack, _Mapping]] = ..., acks: _Optional[_Union[AckBatch, _Mapping]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("job", "signals")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    job: str
    signals: Signals
    def __init__(self, job: _Optional[str] = ..., signals: _Optional[_Union[Signals, _Mapping]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("ack", "latest")
    ACK_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    latest: WeightVersion
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., latest: _Optional[_Union[WeightVersion, _Mapping]] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("job", "step", "version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    version: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class GetWeightsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: WeightVersion
    def __init__(self, version: _Optional[_Union[WeightVersion, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("job", "after_version", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    after_version: int
    limit: int
    def __init__(self, job: _Optional[str] = ..., after_version: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[WeightVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[WeightVersion, _Mapping]]] = ...) -> None: ...

class WatchWeightsRequest(_message.Message):
    __slots__ = ("job", "after_version", "max_batch")
    JOB_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    job: str
    after_version: int
    max_batch: int
    def __init__(self, job: _Optional[str] = ..., after_version: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...

class WatchWeightsResponse(_message.Message):
    __slots__ = ("version", "more")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    version: WeightVersion
    more: _containers.RepeatedCompositeFieldContainer[WeightVersion]
    def __init__(self, version: _Optional[_Union[WeightVersion, _Mapping]] = ..., more: _Optional[_Iterable[_Union[WeightVersion, _Mapping]]] = ...) -> None: ...
