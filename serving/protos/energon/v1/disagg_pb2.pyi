from serving.protos.energon.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvDescriptor(_message.Message):
    __slots__ = ("uuid", "transfer_address", "num_pages", "bucket_pages", "num_computed_tokens", "null_slots", "cached_tokens")
    UUID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    BUCKET_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NULL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    transfer_address: str
    num_pages: int
    bucket_pages: int
    num_computed_tokens: int
    null_slots: _containers.RepeatedScalarFieldContainer[int]
    cached_tokens: int
    def __init__(self, uuid: _Optional[int] = ..., transfer_address: _Optional[str] = ..., num_pages: _Optional[int] = ..., bucket_pages: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., null_slots: _Optional[_Iterable[int]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first", "kv", "prompt_token_ids")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    first: _inference_pb2.GenerateResponse
    kv: KvDescriptor
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ..., kv: _Optional[_Union[KvDescriptor, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "first_token_id", "kv")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    request: _inference_pb2.GenerateRequest
    first_token_id: int
    kv: KvDescriptor
    def __init__(self, request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., first_token_id: _Optional[int] = ..., kv: _Optional[_Union[KvDescriptor, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("in_flight", "pages_used", "pages_total", "pulls", "pull_seconds", "pull_bytes")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    PULL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PULL_BYTES_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    pages_used: int
    pages_total: int
    pulls: int
    pull_seconds: float
    pull_bytes: int
    def __init__(self, in_flight: _Optional[int] = ..., pages_used: _Optional[int] = ..., pages_total: _Optional[int] = ..., pulls: _Optional[int] = ..., pull_seconds: _Optional[float] = ..., pull_bytes: _Optional[int] = ...) -> None: ...
