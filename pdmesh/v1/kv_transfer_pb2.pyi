from pdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetTransferMetadataRequest(_message.Message):
    __slots__ = ("layout",)
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KvLayout
    def __init__(self, layout: _Optional[_Union[_common_pb2.KvLayout, _Mapping]] = ...) -> None: ...

class GetTransferMetadataResponse(_message.Message):
    __slots__ = ("layout", "nixl_agent_name", "nixl_agent_metadata", "pool_base_address", "num_blocks", "memory_type", "device_id")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    POOL_BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KvLayout
    nixl_agent_name: str
    nixl_agent_metadata: bytes
    pool_base_address: int
    num_blocks: int
    memory_type: str
    device_id: int
    def __init__(self, layout: _Optional[_Union[_common_pb2.KvLayout, _Mapping]] = ..., nixl_agent_name: _Optional[str] = ..., nixl_agent_metadata: _Optional[bytes] = ..., pool_base_address: _Optional[int] = ..., num_blocks: _Optional[int] = ..., memory_type: _Optional[str] = ..., device_id: _Optional[int] = ...) -> None: ...

class PullKvRequest(_message.Message):
    __slots__ = ("lease_id", "chunk_bytes")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    chunk_bytes: int
    def __init__(self, lease_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class PullKvResponse(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseKvResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
