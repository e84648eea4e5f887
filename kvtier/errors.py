"""One error tree for the daemon, the client and the CLI.

    KvtierError                      base; .code is the gRPC status it maps to
    ├── InvalidArgument              INVALID_ARGUMENT     malformed request
    │   ├── BadKey                                        wrong key length, empty batch, ...
    │   └── BadNamespace                                  name fails the namespace rule
    ├── NotFound                     NOT_FOUND            key, reservation or lease unknown/expired
    │   ├── UnknownReservation
    │   └── UnknownLease
    ├── FailedPrecondition           FAILED_PRECONDITION  e.g. reservation already committed
    ├── StaleArena                   ABORTED              client mapped an old arena: attach again
    ├── ResourceExhausted            RESOURCE_EXHAUSTED   no room, too large, message too big
    │   ├── TooLarge                                      block > arena or > max_block_bytes
    │   └── ArenaFull                                     all space pinned, leased or reserved
    ├── DataLoss                     DATA_LOSS            bytes do not match their checksum
    ├── PermissionDenied             PERMISSION_DENIED    credentials do not allow the namespace
    ├── Unauthenticated              UNAUTHENTICATED      missing or wrong token
    ├── Unavailable                  UNAVAILABLE          daemon unreachable (connection is dead;
    │                                                     retry after reconnect)
    ├── DeadlineExceeded             DEADLINE_EXCEEDED    call timed out (connection may be fine)
    ├── ConfigError                  (not on the wire)    bad configuration value
    └── Internal                     INTERNAL             a bug; the request changed nothing

Every leaf maps to exactly one gRPC status code (``CODE_TO_ERROR`` is the one
table both directions use). ``retryable`` is True for errors after which the
same call may succeed once the daemon is reachable again.
"""
from __future__ import annotations

import grpc


class KvtierError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable = False


class InvalidArgument(KvtierError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class BadKey(InvalidArgument):
    pass


class BadNamespace(InvalidArgument):
    pass


class NotFound(KvtierError):
    code = grpc.StatusCode.NOT_FOUND


class UnknownReservation(NotFound):
    pass


class UnknownLease(NotFound):
    pass


class FailedPrecondition(KvtierError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleArena(KvtierError):
    code = grpc.StatusCode.ABORTED
    retryable = True


class ResourceExhausted(KvtierError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(ResourceExhausted):
    pass


class ArenaFull(ResourceExhausted):
    pass


class DataLoss(KvtierError):
    code = grpc.StatusCode.DATA_LOSS


class PermissionDenied(KvtierError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(KvtierError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(KvtierError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(KvtierError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Internal(KvtierError):
    code = grpc.StatusCode.INTERNAL


class ConfigError(KvtierError):
    """A configuration file or value is wrong; never sent on the wire."""


# Status code -> the exception a client raises for it.
CODE_TO_ERROR: dict[grpc.StatusCode, type[KvtierError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, FailedPrecondition, StaleArena, ResourceExhausted, DataLoss,
        PermissionDenied, Unauthenticated, Unavailable, DeadlineExceeded, Internal,
    )
}


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, detail: str) -> KvtierError:
    """The KvtierError for a status code (or its number, as the data channel sends it) and its
    message: one mapping for both transports."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    exc = CODE_TO_ERROR.get(code, KvtierError)(detail or code.name)
    exc.code = code
    return exc


def from_rpc_error(err: grpc.RpcError) -> KvtierError:
    """Turn a gRPC error into the matching KvtierError (its message kept)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, detail)
