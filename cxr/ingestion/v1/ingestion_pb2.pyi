from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_QUEUED: _ClassVar[JobStatus]
    JOB_STATUS_RUNNING: _ClassVar[JobStatus]
    JOB_STATUS_DONE: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_SKIPPED: _ClassVar[JobStatus]
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_QUEUED: JobStatus
JOB_STATUS_RUNNING: JobStatus
JOB_STATUS_DONE: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_SKIPPED: JobStatus

class AnalyzeRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: AnalyzeMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[AnalyzeMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class AnalyzeMetadata(_message.Message):
    __slots__ = ("client_name", "expected_size", "skip_cache", "skip_explanation", "explanation_method")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    SKIP_EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    expected_size: int
    skip_cache: bool
    skip_explanation: bool
    explanation_method: str
    def __init__(self, client_name: _Optional[str] = ..., expected_size: _Optional[int] = ..., skip_cache: _Optional[bool] = ..., skip_explanation: _Optional[bool] = ..., explanation_method: _Optional[str] = ...) -> None: ...

class DicomIdentity(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality", "view_position")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    VIEW_POSITION_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    view_position: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., modality: _Optional[str] = ..., view_position: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "members", "ensemble_rule", "intended_use")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_RULE_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    members: _containers.RepeatedScalarFieldContainer[str]
    ensemble_rule: str
    intended_use: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., ensemble_rule: _Optional[str] = ..., intended_use: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("label", "probability", "model_probabilities", "votes", "n_models", "threshold", "positive")
    class ModelProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    model_probabilities: _containers.ScalarMap[str, float]
    votes: int
    n_models: int
    threshold: float
    positive: bool
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., model_probabilities: _Optional[_Mapping[str, float]] = ..., votes: _Optional[int] = ..., n_models: _Optional[int] = ..., threshold: _Optional[float] = ..., positive: _Optional[bool] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("identity", "model", "findings", "job_id", "cached", "warnings", "notice", "timings_ms")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    identity: DicomIdentity
    model: ModelInfo
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    job_id: str
    cached: bool
    warnings: _containers.RepeatedScalarFieldContainer[str]
    notice: str
    timings_ms: _containers.ScalarMap[str, float]
    def __init__(self, identity: _Optional[_Union[DicomIdentity, _Mapping]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., job_id: _Optional[str] = ..., cached: _Optional[bool] = ..., warnings: _Optional[_Iterable[str]] = ..., notice: _Optional[str] = ..., timings_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetExplanationRequest(_message.Message):
    __slots__ = ("job_id", "render", "labels", "positive_only", "dicom")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    render: bool
    labels: _containers.RepeatedScalarFieldContainer[str]
    positive_only: bool
    dicom: bool
    def __init__(self, job_id: _Optional[str] = ..., render: _Optional[bool] = ..., labels: _Optional[_Iterable[str]] = ..., positive_only: _Optional[bool] = ..., dicom: _Optional[bool] = ...) -> None: ...

class DicomObject(_message.Message):
    __slots__ = ("kind", "sop_class_uid", "sop_instance_uid", "series_instance_uid", "description", "data")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    description: str
    data: bytes
    def __init__(self, kind: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., description: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WatchExplanationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class LabelExplanation(_message.Message):
    __slots__ = ("label", "probability", "votes", "n_models", "positive", "spatial_agreement", "mean_disagreement", "overlay_png", "disagreement_png", "panel_png", "explained")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    N_MODELS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_PNG_FIELD_NUMBER: _ClassVar[int]
    PANEL_PNG_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    votes: int
    n_models: int
    positive: bool
    spatial_agreement: float
    mean_disagreement: float
    overlay_png: bytes
    disagreement_png: bytes
    panel_png: bytes
    explained: bool
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., votes: _Optional[int] = ..., n_models: _Optional[int] = ..., positive: _Optional[bool] = ..., spatial_agreement: _Optional[float] = ..., mean_disagreement: _Optional[float] = ..., overlay_png: _Optional[bytes] = ..., disagreement_png: _Optional[bytes] = ..., panel_png: _Optional[bytes] = ..., explained: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("job_id", "status", "failure_reason", "model", "labels", "method", "notice", "dicom_objects", "summary_png")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    DICOM_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_PNG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: JobStatus
    failure_reason: str
    model: ModelInfo
    labels: _containers.RepeatedCompositeFieldContainer[LabelExplanation]
    method: str
    notice: str
    dicom_objects: _containers.RepeatedCompositeFieldContainer[DicomObject]
    summary_png: bytes
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., failure_reason: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., labels: _Optional[_Iterable[_Union[LabelExplanation, _Mapping]]] = ..., method: _Optional[str] = ..., notice: _Optional[str] = ..., dicom_objects: _Optional[_Iterable[_Union[DicomObject, _Mapping]]] = ..., summary_png: _Optional[bytes] = ...) -> None: ...

class ExplanationProgress(_message.Message):
    __slots__ = ("job_id", "status", "progress", "message", "failure_reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: JobStatus
    progress: float
    message: str
    failure_reason: str
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., failure_reason: _Optional[str] = ...) -> None: ...
