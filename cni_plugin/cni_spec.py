"""The CNI specification as the plugin needs it: invocation, error JSON, result versions.

Pure and stdlib-only (the plugin imports it for every pod sandbox). It turns the runtime's
environment and stdin into a :class:`Invocation`, raises :class:`CniError` with the spec's
error codes when they are malformed, and converts a chained ``prevResult`` to the version
the network configuration asks for. Nothing here writes to stdout: :mod:`cni_plugin.plugin`
prints exactly one result or one error.
"""

from __future__ import annotations

from cni_plugin import json_codec
from cni_plugin.constants import SUPPORTED_CNI_VERSIONS

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: ``typing`` imports ``re`` (ms per pod sandbox)
    from collections.abc import Mapping
    from typing import Any

# Error codes of the CNI spec ("Error" section); 100+ are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_AGENT = 100  # the node agent refused or failed the enrolment
ERR_INTERNAL = 999  # what Go's skel reports for an unexpected failure

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Variables the spec requires per command (CNI_NETNS is optional for DEL).
_REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
}
K8S_ARGS = ("K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")
LATEST_VERSION = SUPPORTED_CNI_VERSIONS[-1]


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON (``code``, ``msg``, ``details``)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details
        self.cni_version: str | None = None  # the config's version, once known

    def to_json(self, cni_version: str) -> str:
        return json_codec.dumps(
            {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}
        )


class Invocation:
    """One validated plugin call: command, environment, parsed config and CNI_ARGS."""

    def __init__(
        self, command: str, env: Mapping[str, str], config: dict[str, Any], args: dict[str, str]
    ) -> None:
        self.command = command
        self.env = env
        self.config = config
        self.args = args

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion") or LATEST_VERSION)

    @property
    def netns(self) -> str:
        return self.env.get("CNI_NETNS", "")

    @property
    def container_id(self) -> str:
        return self.env.get("CNI_CONTAINERID", "")


def parse_command(env: Mapping[str, str]) -> str:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        shown = repr(command) if command else "unset"
        raise CniError(
            ERR_INVALID_ENV,
            f"invalid CNI_COMMAND ({shown}): the runtime must set it to one of "
            + ", ".join(COMMANDS),
        )
    return command


def check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [name for name in _REQUIRED_ENV.get(command, ()) if not env.get(name)]
    if missing:
        raise CniError(
            ERR_INVALID_ENV,
            f"missing environment variable(s) {', '.join(missing)} for CNI_COMMAND={command}: "
            "the container runtime must set them (CNI spec, 'Parameters')",
        )


def parse_cni_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS`` is ``K=V;K=V``; values may be empty, keys may not."""
    out: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(
                ERR_INVALID_ENV,
                f"malformed CNI_ARGS entry {part!r}: expected KEY=VALUE pairs separated by ';'",
            )
        out[key] = value
    return out


def parse_config(stdin: bytes, command: str) -> dict[str, Any]:
    """Decode and type-check the network configuration on stdin."""
    if not stdin.strip():
        if command == "VERSION":
            return {}
        raise CniError(
            ERR_DECODE, "empty network configuration on stdin: the runtime must pass the config"
        )
    try:
        conf = json_codec.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(
            ERR_DECODE, f"network configuration on stdin is not JSON ({e}): fix the conflist"
        ) from None
    if not isinstance(conf, dict):
        raise CniError(
            ERR_DECODE,
            f"network configuration must be a JSON object, got {type(conf).__name__}",
        )
    if command == "VERSION":
        return conf
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(
            ERR_INVALID_CONFIG,
            "field cniVersion is missing or not a string: set it in the conflist",
        )
    if version not in SUPPORTED_CNI_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}: this plugin supports "
            + ", ".join(SUPPORTED_CNI_VERSIONS),
        )
    _check_types(conf)
    return conf


_FIELD_TYPES: Mapping[str, tuple[type, str]] = {
    "name": (str, "a string"),
    "type": (str, "a string"),
    "plugin_log_level": (str, "a string (debug, info, warn, error)"),
    "cni_agent_run_dir": (str, "a directory path string"),
    "ambient_enabled": (bool, "true or false"),
    # Newer Istio's plugin: it selects nftables for sidecar rules, which this plugin never
    # applies (ambient rules are the agent's); typed here so a bad entry is named.
    "native_nftables": (bool, "true or false"),
    "pod_namespace": (str, "a string"),
    "exclude_namespaces": (list, "a list of namespace names"),
    "prevResult": (dict, "a CNI result object"),
}


def _check_types(conf: Mapping[str, Any]) -> None:
    for key, (want, described) in _FIELD_TYPES.items():
        if key in conf and conf[key] is not None and not isinstance(conf[key], want):
            raise CniError(
                ERR_INVALID_CONFIG,
                f"field {key!r} must be {described}, got {json_codec.dumps(conf[key])}: "
                "fix the conflist",
            )
    excluded = conf.get("exclude_namespaces") or []
    if not all(isinstance(n, str) for n in excluded):
        raise CniError(
            ERR_INVALID_CONFIG,
            "field 'exclude_namespaces' must hold only strings: fix the conflist",
        )
    prev = conf.get("prevResult")
    if prev is not None:
        ips = prev.get("ips", [])
        if not isinstance(ips, list) or not all(
            isinstance(ip, dict) and isinstance(ip.get("address"), str) and "/" in ip["address"]
            for ip in ips
        ):
            raise CniError(
                ERR_INVALID_CONFIG,
                "prevResult.ips must be a list of objects with an 'address' in CIDR form "
                "(e.g. 10.244.1.5/24): the previous plugin in the chain produced a bad result",
            )


def parse(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Everything the runtime handed us, validated, or a :class:`CniError`."""
    command = parse_command(env)
    check_env(command, env)
    config = parse_config(stdin, command)
    try:
        args = parse_cni_args(env.get("CNI_ARGS", "")) if command != "VERSION" else {}
    except CniError as e:
        e.cni_version = str(config.get("cniVersion") or LATEST_VERSION)
        raise
    return Invocation(command, env, config, args)


def version_result(config: Mapping[str, Any]) -> str:
    requested = config.get("cniVersion")
    version = requested if isinstance(requested, str) and requested else LATEST_VERSION
    return json_codec.dumps(
        {"cniVersion": version, "supportedVersions": list(SUPPORTED_CNI_VERSIONS)}
    )


def _is_v1(version: str) -> bool:
    return not version.startswith("0.")


def convert_result(prev: Mapping[str, Any] | None, cni_version: str) -> dict[str, Any]:
    """``prevResult`` re-expressed in ``cni_version``; an empty result when there is none.

    0.3.x/0.4.0 results carry ``ips[].version`` ("4"/"6"); 1.x results do not. Everything
    else is passed through untouched: this plugin never changes the pod's network.
    """
    if prev is None:
        return {"cniVersion": cni_version, "dns": {}}
    out = dict(prev)
    out["cniVersion"] = cni_version
    if "ips" in out:
        ips = []
        for entry in out["ips"]:
            ip = dict(entry)
            if _is_v1(cni_version):
                ip.pop("version", None)
            elif "version" not in ip:
                ip["version"] = "6" if ":" in ip["address"] else "4"
            ips.append(ip)
        out["ips"] = ips
    return out
