from mintmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraConfig(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTrainingRunRequest(_message.Message):
    __slots__ = ("run_id", "lora", "seed", "tenant", "from_ref", "with_optimizer", "replace", "init_state", "init_adapter", "parent_data_digest", "parent_ref")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FROM_REF_FIELD_NUMBER: _ClassVar[int]
    WITH_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    INIT_STATE_FIELD_NUMBER: _ClassVar[int]
    INIT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PARENT_DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARENT_REF_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    lora: LoraConfig
    seed: int
    tenant: str
    from_ref: str
    with_optimizer: bool
    replace: bool
    init_state: bytes
    init_adapter: bytes
    parent_data_digest: str
    parent_ref: str
    def __init__(self, run_id: _Optional[str] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., seed: _Optional[int] = ..., tenant: _Optional[str] = ..., from_ref: _Optional[str] = ..., with_optimizer: _Optional[bool] = ..., replace: _Optional[bool] = ..., init_state: _Optional[bytes] = ..., init_adapter: _Optional[bytes] = ..., parent_data_digest: _Optional[str] = ..., parent_ref: _Optional[str] = ...) -> None: ...

class CreateTrainingRunResponse(_message.Message):
    __slots__ = ("run_id", "executor", "trainable_parameters", "lora", "steps")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    executor: str
    trainable_parameters: int
    lora: LoraConfig
    steps: int
    def __init__(self, run_id: _Optional[str] = ..., executor: _Optional[str] = ..., trainable_parameters: _Optional[int] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., steps: _Optional[int] = ...) -> None: ...

class TrainingDatum(_message.Message):
    __slots__ = ("input_ids", "target_tokens", "weights", "logprobs", "advantages", "reference_input_ids")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    target_tokens: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    advantages: _containers.RepeatedScalarFieldContainer[float]
    reference_input_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., target_tokens: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Iterable[float]] = ..., advantages: _Optional[_Iterable[float]] = ..., reference_input_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("run_id", "data", "loss_fn", "loss_fn_config", "forward_only", "reference_ref", "reference")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ONLY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_REF_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    data: _containers.RepeatedCompositeFieldContainer[TrainingDatum]
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    forward_only: bool
    reference_ref: str
    reference: _common_pb2.AdapterRevision
    def __init__(self, run_id: _Optional[str] = ..., data: _Optional[_Iterable[_Union[TrainingDatum, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., forward_only: _Optional[bool] = ..., reference_ref: _Optional[str] = ..., reference: _Optional[_Union[_common_pb2.AdapterRevision, _Mapping]] = ...) -> None: ...

class DatumLogprobs(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("outputs", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[DatumLogprobs]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, outputs: _Optional[_Iterable[_Union[DatumLogprobs, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AdamParams(_message.Message):
    __slots__ = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("run_id", "adam")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    adam: AdamParams
    def __init__(self, run_id: _Optional[str] = ..., adam: _Optional[_Union[AdamParams, _Mapping]] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("metrics", "steps")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    steps: int
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ..., steps: _Optional[int] = ...) -> None: ...

class SaveRunWeightsRequest(_message.Message):
    __slots__ = ("run_id", "name", "labels", "with_state")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WITH_STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    labels: _containers.ScalarMap[str, str]
    with_state: bool
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., with_state: _Optional[bool] = ...) -> None: ...

class SaveRunWeightsResponse(_message.Message):
    __slots__ = ("adapter_config_json", "safetensors", "steps", "last_loss", "data_digest", "ref", "digest", "state", "parent_ref")
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARENT_REF_FIELD_NUMBER: _ClassVar[int]
    adapter_config_json: str
    safetensors: bytes
    steps: int
    last_loss: float
    data_digest: str
    ref: str
    digest: str
    state: bytes
    parent_ref: str
    def __init__(self, adapter_config_json: _Optional[str] = ..., safetensors: _Optional[bytes] = ..., steps: _Optional[int] = ..., last_loss: _Optional[float] = ..., data_digest: _Optional[str] = ..., ref: _Optional[str] = ..., digest: _Optional[str] = ..., state: _Optional[bytes] = ..., parent_ref: _Optional[str] = ...) -> None: ...

class DropTrainingRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DropTrainingRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocateTrainingRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class LocateTrainingRunResponse(_message.Message):
    __slots__ = ("tenant", "parent_ref", "steps")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PARENT_REF_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    parent_ref: str
    steps: int
    def __init__(self, tenant: _Optional[str] = ..., parent_ref: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class NoteTrainingRunSavedRequest(_message.Message):
    __slots__ = ("run_id", "ref")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    ref: str
    def __init__(self, run_id: _Optional[str] = ..., ref: _Optional[str] = ...) -> None: ...

class NoteTrainingRunSavedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
