"""A put_many that fails for some blocks tells which keys are stored, on every path: the error
it raises (the first failing block's) carries ``stored``, one entry per block: True for a block
stored (written by the call or found present), False for one the call did not store."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from kvtier import errors
from kvtier.client import AsyncClient, Client

PATHS = {"arena": {}, "data": {"attach": False}, "grpc": {"attach": False, "data_channel": False}}


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


def items(n: int, bad: set[int], tag="k") -> list[tuple[bytes, bytes]]:
    """n blocks of 4 KiB; those in bad are empty (a block the daemon refuses)."""
    return [(key((tag, i)), b"" if i in bad else bytes([i % 251 + 1]) * 4096) for i in range(n)]


def present(c, batch) -> list[bool]:
    return [t != 0 for t in c.lookup("ns", [k for k, _ in batch])[0]]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_failed_put_many_says_which_keys_are_stored(make_daemon, path):
    d = make_daemon(server={"max_batch": 4})  # the arena path reserves 4 blocks at a time
    batch = items(10, {1, 6})
    with Client(d.address, **PATHS[path]) as c:
        c.put("ns", batch[5][0], batch[5][1])  # already there before the call
        with pytest.raises(errors.InvalidArgument) as e:
            c.put_many("ns", batch)
        assert c.path == path
        found = present(c, batch)
        assert all(p for s, p in zip(e.value.stored, found) if s)  # none claimed that is not there
        # every one the call stored is claimed; the arena's first batch failed, and it never got to
        # the second, where block 5 was already present
        assert [i for i, p in enumerate(found) if p and not e.value.stored[i]] == ([5] if path == "arena" else [])
        assert e.value.stored[1] is e.value.stored[6] is False
        if path == "data":  # the daemon stores every block it can
            assert e.value.stored == [i not in (1, 6) for i in range(10)]
        if path == "grpc":  # block after block, up to the first refused
            assert e.value.stored == [True] + [False] * 4 + [True] + [False] * 4


def test_a_failed_put_many_over_grpc_with_overwrite_does_not_claim_old_blocks(daemon):
    batch = items(4, {1})
    with Client(daemon.address, attach=False, data_channel=False) as c:
        c.put("ns", batch[3][0], b"old" * 100)
        with pytest.raises(errors.InvalidArgument) as e:
            c.put_many("ns", batch, overwrite=True)
        # block 0 was written before the daemon refused block 1; block 3 holds the old bytes, and
        # the client cannot tell them from its own
        assert e.value.stored[1] is False
        assert all(s is None or s == p for s, p in zip(e.value.stored, present(c, batch)))
        assert e.value.stored[3] is None


def test_a_failed_async_put_many_says_which_keys_are_stored(daemon):
    batch = items(6, {2})

    async def main():
        async with AsyncClient(daemon.address, attach=False) as c:
            with pytest.raises(errors.InvalidArgument) as e:
                await c.put_many("ns", batch)
            assert c.path == "data"
            return e.value.stored
    stored = asyncio.run(main())
    with Client(daemon.address) as c:
        assert stored == present(c, batch) == [i != 2 for i in range(6)]


def test_a_put_many_over_the_arena_failing_in_its_second_part_reports_the_first(daemon):
    """64 blocks or more are reserved and committed in two parts: the first part's Commit is
    answered while the second part's Reserve fails."""
    batch = items(80, {70})
    with Client(daemon.address) as c:
        with pytest.raises(errors.InvalidArgument) as e:
            c.put_many("ns", batch)
        assert c.path == "arena"
        assert e.value.stored == present(c, batch)
        assert e.value.stored[:30] == [True] * 30 and e.value.stored[70] is False
