"""Reading iptables-save and diffing it against the model (pure)."""

from __future__ import annotations

from cni_plugin.redirection.iptables_rules import Family, inpod_rules
from cni_plugin.redirection.iptables_state import diff, parse_save, removal_script
from cni_plugin.redirection.settings import RedirectSettings

SETTINGS = RedirectSettings(ipv6=False, dns_capture=False, bypass_inbound=True)


def _save_of(settings: RedirectSettings, *, drop: str = "", add: tuple[str, str] = ("", "")) -> str:
    """iptables-save text as the kernel would print the model's rules (optionally altered),
    beside a foreign rule that must never be touched."""
    rs = inpod_rules(settings, Family.IPV4)
    out = []
    for table in rs.tables():
        out.append(f"*{table}")
        out += [":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        out += [f":{ch} - [0:0]" for ch in rs.chains(table)]
        out.append("-A OUTPUT -p tcp --dport 9 -j ACCEPT")  # someone else's
        out += [r.save_line(Family.IPV4) for r in rs.rules_of(table)
                if r.save_line(Family.IPV4) != drop]  # fmt: skip
        if add[0] == table:
            out.append(add[1])
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def test_exact_state_has_no_differences() -> None:
    rs = inpod_rules(SETTINGS, Family.IPV4)
    assert diff(rs, parse_save(_save_of(SETTINGS))) == ([], [])


def test_missing_and_extra_rules_are_named() -> None:
    rs = inpod_rules(SETTINGS, Family.IPV4)
    victim = rs.rules_of("nat")[-1].save_line(Family.IPV4)
    stray = "-A ISTIO_OUTPUT -p tcp -j ACCEPT"
    missing, extra = diff(rs, parse_save(_save_of(SETTINGS, drop=victim, add=("nat", stray))))
    assert missing == [f"ipv4 nat: {victim}"]
    assert extra == [f"ipv4 nat: {stray}"]


def test_rules_of_other_settings_are_extra_and_foreign_rules_ignored() -> None:
    default = RedirectSettings(ipv6=False, dns_capture=True)
    missing, extra = diff(inpod_rules(SETTINGS, Family.IPV4), parse_save(_save_of(default)))
    assert not missing
    assert "ipv4 raw: chain ISTIO_OUTPUT" in extra
    assert any("--to-ports 15006" in e for e in extra)
    assert not any("--dport 9" in e for e in extra + missing)


def test_removal_deletes_jumps_and_our_chains_only() -> None:
    script = removal_script(parse_save(_save_of(SETTINGS)))
    assert "-D OUTPUT -j ISTIO_OUTPUT" in script and "-D PREROUTING -j ISTIO_PRERT" in script
    assert "-X ISTIO_OUTPUT" in script and "-F ISTIO_PRERT" in script
    assert "--dport 9" not in script
    assert removal_script(parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")) == ""


def test_host_probe_state_uses_the_host_chain() -> None:
    from cni_plugin.redirection.iptables_rules import HOST_CHAINS, host_probe_rules

    rs = host_probe_rules(RedirectSettings(), Family.IPV4)
    text = "*nat\n:POSTROUTING ACCEPT [0:0]\n:ISTIO_POSTRT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
    text += "\n".join(r.save_line(Family.IPV4) for r in rs.rules) + "\nCOMMIT\n"
    saved = parse_save(text, own=HOST_CHAINS)
    assert diff(rs, saved) == ([], [])
    script = removal_script(saved)
    assert "-X ISTIO_POSTRT" in script and "ISTIO_OUTPUT" not in script


def _listing(*objects: dict[str, object]) -> str:
    import json

    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *objects]})


def test_only_tables_left_with_empty_accept_base_chains_are_deleted() -> None:
    from cni_plugin.redirection.iptables_restore import emptied_tables_script

    def base(table: str, name: str, policy: str = "accept") -> dict[str, object]:
        return {"chain": {"family": "ip", "table": table, "name": name, "hook": "x",
                          "policy": policy}}  # fmt: skip

    listing = _listing(
        {"table": {"family": "ip", "name": "mangle"}},
        base("mangle", "PREROUTING"),
        {"table": {"family": "ip", "name": "nat"}},
        base("nat", "OUTPUT"),
        {"rule": {"family": "ip", "table": "nat", "chain": "OUTPUT", "expr": []}},
        {"table": {"family": "ip", "name": "raw"}},
        base("raw", "OUTPUT", policy="drop"),
        {"table": {"family": "ip", "name": "filter"}},
        {"chain": {"family": "ip", "table": "filter", "name": "KUBE-X"}},
        {"table": {"family": "ip6", "name": "mangle"}},
    )
    candidates = ["filter", "mangle", "nat", "raw", "security"]
    assert emptied_tables_script(listing, Family.IPV4, candidates) == "delete table ip mangle\n"
    # A table we never wrote into is left alone even when empty; IPv6 reads its own family.
    assert emptied_tables_script(listing, Family.IPV4, ["nat", "raw"]) == ""
    assert emptied_tables_script(listing, Family.IPV6, ["mangle"]) == "delete table ip6 mangle\n"
    assert emptied_tables_script("not json", Family.IPV4, candidates) == ""
