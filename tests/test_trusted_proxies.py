"""``SWITCHBOARD_TRUSTED_PROXIES`` end to end: whose ``X-Forwarded-For`` counts.

Every client of these tests connects from 127.0.0.1, as a reverse proxy on
the same host would. With one connection allowed per IP, the forwarded
client address decides who is admitted when 127.0.0.1 is a trusted proxy,
and is ignored (everyone is 127.0.0.1) when it is not.
"""

from __future__ import annotations

from typing import Any

import pytest

from switchboard_client import ClientError

pytestmark = pytest.mark.asyncio


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def refused_for_ip(gw: Any, user: str, headers: dict[str, str]) -> ClientError:
    with pytest.raises(ClientError) as info:
        await gw.client(user, headers=headers).connect()
    assert (info.value.code, info.value.close_code) == ("TOO_MANY_CONNECTIONS", 4429)
    assert info.value.details == {"limit": 1, "per": "ip"}
    return info.value


async def test_forwarded_client_addresses_count_behind_a_trusted_proxy(
    gateway_factory: Any,
) -> None:
    gw = await gateway_factory(trusted_proxies="127.0.0.1/32", max_connections_per_ip=1)
    first = await gw.connect("alice", headers=forwarded("203.0.113.7"))
    second = await gw.connect("bob", headers=forwarded("198.51.100.2"))
    # A chain: the client added a hop, the trusted proxy appended the address it saw.
    third = await gw.connect("carol", headers=forwarded("10.9.9.9, 192.0.2.44, 127.0.0.1"))
    assert {c.welcome["userId"] for c in (first, second, third)} == {"alice", "bob", "carol"}

    # Same forwarded client address as the first: over its per-IP limit.
    await refused_for_ip(gw, "dave", forwarded("203.0.113.7"))
    # A client cannot dodge the limit by prepending a made-up hop.
    await refused_for_ip(gw, "erin", forwarded("1.2.3.4, 203.0.113.7"))
    # Without the header the proxy's own address counts, which is still free.
    direct = await gw.connect("frank")
    await refused_for_ip(gw, "grace", {})

    # Slots are released under the forwarded address when a connection closes.
    await first.aclose()
    again = await gw.connect("dave", headers=forwarded("203.0.113.7"))
    for client in (second, third, direct, again):
        assert "serverTime" in await client.emit("system:ping", {})


async def test_forwarded_for_is_ignored_without_trusted_proxies(gateway_factory: Any) -> None:
    gw = await gateway_factory(max_connections_per_ip=1)
    assert gw.config.trusted_proxies == ()
    first = await gw.connect("alice", headers=forwarded("203.0.113.7"))
    # A different claimed address does not help: both are 127.0.0.1.
    await refused_for_ip(gw, "bob", forwarded("198.51.100.2"))
    assert "serverTime" in await first.emit("system:ping", {})


async def test_forwarded_for_is_ignored_from_an_untrusted_peer(gateway_factory: Any) -> None:
    # Trusting some other network is not trusting 127.0.0.1.
    gw = await gateway_factory(trusted_proxies="10.0.0.0/8", max_connections_per_ip=1)
    await gw.connect("alice", headers=forwarded("203.0.113.7"))
    await refused_for_ip(gw, "bob", forwarded("198.51.100.2"))
