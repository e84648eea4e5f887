from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_MISSING: _ClassVar[Tier]
    TIER_RAM: _ClassVar[Tier]
    TIER_NVME: _ClassVar[Tier]
    TIER_CLUSTER: _ClassVar[Tier]

class ReserveStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVE_OK: _ClassVar[ReserveStatus]
    RESERVE_PRESENT: _ClassVar[ReserveStatus]
    RESERVE_PENDING: _ClassVar[ReserveStatus]
TIER_MISSING: Tier
TIER_RAM: Tier
TIER_NVME: Tier
TIER_CLUSTER: Tier
RESERVE_OK: ReserveStatus
RESERVE_PRESENT: ReserveStatus
RESERVE_PENDING: ReserveStatus

class AttachRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("arena_path", "arena_size", "generation", "data_offset", "data_address", "max_block_bytes", "max_batch", "key_sizes", "max_message_bytes", "version", "default_lease_ms", "default_reservation_ms", "data_channel_version", "max_ttl_ms")
    ARENA_PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESERVATION_MS_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    arena_path: str
    arena_size: int
    generation: int
    data_offset: int
    data_address: str
    max_block_bytes: int
    max_batch: int
    key_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_message_bytes: int
    version: str
    default_lease_ms: int
    default_reservation_ms: int
    data_channel_version: int
    max_ttl_ms: int
    def __init__(self, arena_path: _Optional[str] = ..., arena_size: _Optional[int] = ..., generation: _Optional[int] = ..., data_offset: _Optional[int] = ..., data_address: _Optional[str] = ..., max_block_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., key_sizes: _Optional[_Iterable[int]] = ..., max_message_bytes: _Optional[int] = ..., version: _Optional[str] = ..., default_lease_ms: _Optional[int] = ..., default_reservation_ms: _Optional[int] = ..., data_channel_version: _Optional[int] = ..., max_ttl_ms: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("tiers", "prefix_len")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    tiers: bytes
    prefix_len: int
    def __init__(self, tiers: _Optional[bytes] = ..., prefix_len: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys", "sizes", "ttl_ms", "overwrite", "generation")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    sizes: _containers.RepeatedScalarFieldContainer[int]
    ttl_ms: int
    overwrite: bool
    generation: int
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ..., sizes: _Optional[_Iterable[int]] = ..., ttl_ms: _Optional[int] = ..., overwrite: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "status", "offsets", "ttl_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    status: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    ttl_ms: int
    def __init__(self, reservation_id: _Optional[int] = ..., status: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "checksums")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    checksums: bytes
    def __init__(self, reservation_id: _Optional[int] = ..., checksums: _Optional[bytes] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("committed", "checksums")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    committed: int
    checksums: bytes
    def __init__(self, committed: _Optional[int] = ..., checksums: _Optional[bytes] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    def __init__(self, reservation_id: _Optional[int] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys", "lease_ms", "prefix_only", "generation", "tokens_per_key", "background", "uncounted")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ONLY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    UNCOUNTED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    lease_ms: int
    prefix_only: bool
    generation: int
    tokens_per_key: int
    background: bool
    uncounted: bool
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ..., lease_ms: _Optional[int] = ..., prefix_only: _Optional[bool] = ..., generation: _Optional[int] = ..., tokens_per_key: _Optional[int] = ..., background: _Optional[bool] = ..., uncounted: _Optional[bool] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease_id", "tiers", "offsets", "lengths", "checksums", "lease_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    tiers: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    checksums: bytes
    lease_ms: int
    def __init__(self, lease_id: _Optional[int] = ..., tiers: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., checksums: _Optional[bytes] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "key", "length", "checksum", "overwrite")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    length: int
    checksum: bytes
    overwrite: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., length: _Optional[int] = ..., checksum: _Optional[bytes] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("checksums", "stored", "status")
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    checksums: bytes
    stored: int
    status: bytes
    def __init__(self, checksums: _Optional[bytes] = ..., stored: _Optional[int] = ..., status: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys", "chunk_bytes", "tokens_per_key", "uncounted")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    UNCOUNTED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    chunk_bytes: int
    tokens_per_key: int
    uncounted: bool
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ..., chunk_bytes: _Optional[int] = ..., tokens_per_key: _Optional[int] = ..., uncounted: _Optional[bool] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("index", "tier", "length", "checksum")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    index: int
    tier: Tier
    length: int
    checksum: bytes
    def __init__(self, index: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., length: _Optional[int] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys", "ttl_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    ttl_s: int
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pinned",)
    PINNED_FIELD_NUMBER: _ClassVar[int]
    pinned: bytes
    def __init__(self, pinned: _Optional[bytes] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("namespace", "key_size", "keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key_size: int
    keys: bytes
    def __init__(self, namespace: _Optional[str] = ..., key_size: _Optional[int] = ..., keys: _Optional[bytes] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("unpinned",)
    UNPINNED_FIELD_NUMBER: _ClassVar[int]
    unpinned: int
    def __init__(self, unpinned: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "capacity_bytes", "used_bytes", "blocks", "evictions", "policy", "largest_free_bytes", "reserved_bytes", "pinned_blocks", "leased_blocks", "locked", "lock_detail", "backing", "hits", "misses", "checksum_failures", "io_errors", "dropped_writes", "queued_bytes", "promotions", "demotions", "degraded", "direct_io", "huge_pages", "bounce_reads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    LOCK_DETAIL_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    IO_ERRORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DIRECT_IO_FIELD_NUMBER: _ClassVar[int]
    HUGE_PAGES_FIELD_NUMBER: _ClassVar[int]
    BOUNCE_READS_FIELD_NUMBER: _ClassVar[int]
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    evictions: int
    policy: str
    largest_free_bytes: int
    reserved_bytes: int
    pinned_blocks: int
    leased_blocks: int
    locked: bool
    lock_detail: str
    backing: str
    hits: int
    misses: int
    checksum_failures: int
    io_errors: int
    dropped_writes: int
    queued_bytes: int
    promotions: int
    demotions: int
    degraded: _containers.RepeatedScalarFieldContainer[str]
    direct_io: bool
    huge_pages: bool
    bounce_reads: bool
    def __init__(self, name: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., evictions: _Optional[int] = ..., policy: _Optional[str] = ..., largest_free_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., leased_blocks: _Optional[int] = ..., locked: _Optional[bool] = ..., lock_detail: _Optional[str] = ..., backing: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., io_errors: _Optional[int] = ..., dropped_writes: _Optional[int] = ..., queued_bytes: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., degraded: _Optional[_Iterable[str]] = ..., direct_io: _Optional[bool] = ..., huge_pages: _Optional[bool] = ..., bounce_reads: _Optional[bool] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("name", "blocks", "bytes", "hits", "misses", "puts", "put_bytes", "get_bytes", "evictions", "lookups", "prefill_tokens_saved")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    PUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GET_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_SAVED_FIELD_NUMBER: _ClassVar[int]
    name: str
    blocks: int
    bytes: int
    hits: int
    misses: int
    puts: int
    put_bytes: int
    get_bytes: int
    evictions: int
    lookups: int
    prefill_tokens_saved: int
    def __init__(self, name: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., puts: _Optional[int] = ..., put_bytes: _Optional[int] = ..., get_bytes: _Optional[int] = ..., evictions: _Optional[int] = ..., lookups: _Optional[int] = ..., prefill_tokens_saved: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "generation", "arena_path", "leases", "reservations", "tiers", "namespaces", "expired_leases", "expired_reservations")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ARENA_PATH_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    generation: int
    arena_path: str
    leases: int
    reservations: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStats]
    expired_leases: int
    expired_reservations: int
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., generation: _Optional[int] = ..., arena_path: _Optional[str] = ..., leases: _Optional[int] = ..., reservations: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceStats, _Mapping]]] = ..., expired_leases: _Optional[int] = ..., expired_reservations: _Optional[int] = ...) -> None: ...
