"""The uninstall comparison (testbed/node_state.py): counters and empty built-in tables
are no difference; a leftover rule, set, file or pin is."""

from __future__ import annotations

from testbed.node_state import NodeState, _rules, differences

EMPTY_NAT6 = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [3:180]\nCOMMIT\n"
NFT_EMPTY = ("table ip6 nat {\n\tchain POSTROUTING {\n\t\ttype nat hook postrouting priority "
             "srcnat; policy accept;\n\t}\n}\n")  # fmt: skip
KUBE = "*nat\n:POSTROUTING ACCEPT [1:2]\n-A POSTROUTING -j KUBE-POSTROUTING\nCOMMIT\n"


def state(rules: dict[str, str], sets: list[str] = [], files: dict[str, str] = {}) -> NodeState:  # noqa: B006
    return NodeState({"cni_bin_dir": dict(files)}, {k: _rules(v) for k, v in rules.items()},
                     sorted(sets), {})  # fmt: skip


def test_counters_and_empty_builtin_tables_are_no_difference() -> None:
    before = state({"ip6tables-save": "", "nft list ruleset": "", "iptables-save": KUBE})
    after = state({"ip6tables-save": EMPTY_NAT6, "nft list ruleset": NFT_EMPTY,
                   "iptables-save": KUBE.replace("[1:2]", "[900:7000]")})  # fmt: skip
    assert differences(before, after) == {}


def test_a_leftover_rule_set_or_file_is_reported() -> None:
    before = state({"iptables-save": KUBE})
    left = KUBE.replace("COMMIT", "-A POSTROUTING -j ISTIO_POSTRT\nCOMMIT")
    after = state({"iptables-save": left}, sets=["istio-inpod-probes-v4"],
                  files={"istio-cni": "abc"})  # fmt: skip
    diff = differences(before, after)
    assert diff["iptables-save"] == ["+ -A POSTROUTING -j ISTIO_POSTRT"]
    assert diff["ipset"] == ["+ istio-inpod-probes-v4"]
    assert diff["cni_bin_dir"] == ["+ istio-cni"]
