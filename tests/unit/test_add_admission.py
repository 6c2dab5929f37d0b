"""The pure parts of the plugin-ADD admission: what counts as a namespace's addresses and as a
pod address. The whole check over real namespaces: tests/netns/test_agent_netns.py."""

from __future__ import annotations

from node_agent.add_admission import bad_ips, parse_fib_trie_locals, parse_if_inet6

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.98.1.0/24 2 0 2
        |-- 10.98.1.0
           /24 link UNICAST
        |-- 10.98.1.9
           /32 host LOCAL
        |-- 10.98.1.255
           /32 link BROADCAST
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.98.1.9
           /32 host LOCAL
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000009 02 40 00 80     eth0
"""


def test_fib_trie_locals_are_the_assigned_ipv4_addresses() -> None:
    assert parse_fib_trie_locals(FIB_TRIE) == {"10.98.1.9", "127.0.0.1"}


def test_if_inet6_addresses() -> None:
    assert parse_if_inet6(IF_INET6) == {"::1", "fd00::9"}


def test_only_unicast_pod_addresses_pass() -> None:
    assert bad_ips(["10.1.2.3", "fd00::1", "224.0.0.1", "127.0.0.1", "::", "fe80::1", "x", ""]) == [
        "224.0.0.1",
        "127.0.0.1",
        "::",
        "fe80::1",
        "x",
        "",
    ]
