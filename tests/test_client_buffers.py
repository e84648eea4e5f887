"""get_many(into=...) with a buffer too small for its block is InvalidArgument on every path,
and the client stays usable."""
from __future__ import annotations

import hashlib

import pytest

from kvtier import errors
from kvtier.client import Client

PATHS = {"arena": {}, "data": {"attach": False}, "grpc": {"attach": False, "data_channel": False}}


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


@pytest.mark.parametrize("path", list(PATHS))
def test_a_buffer_too_small_is_invalid_argument(daemon, path):
    with Client(daemon.address, **PATHS[path]) as c:
        c.put_many("ns", [(key(0), b"v" * 100), (key(1), b"w" * 100)])
        assert c.path == path
        with pytest.raises(errors.InvalidArgument):
            c.get_many("ns", [key(0), key(1)], into=[bytearray(100), bytearray(10)])
        assert c.get_many("ns", [key(1)]) == [b"w" * 100]
