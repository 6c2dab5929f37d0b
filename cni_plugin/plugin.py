"""``istio-cni``: the chained CNI plugin the container runtime runs for every pod sandbox.

Stdlib only, and it imports only what the path in hand needs: a pod that is not a
candidate (ambient off, not a Kubernetes pod, excluded namespace, our own agent) never
opens a socket; only a pod the agent cannot judge pays for ``ssl`` and the API call.

ADD, in order:
1. Validate env and stdin (:mod:`cni_plugin.cni_spec`); every problem is CNI error JSON.
2. Not a candidate -> print ``prevResult`` (converted to the config's version), done.
3. ``POST /cmdadd`` to the agent on its unix socket, one round trip: the agent judges the
   pod with the one SPEC §2 predicate from its informer caches (the API for a pod it has
   not seen), enrolls an ambient pod before answering (rules in place, ztunnel acked) and
   answers 200 for a pod that is not ambient too. A refusal is checked with the API server
   (as in 4): not ambient -> pass through (Istio's agent refuses such pods: its plugin
   posts only ambient ones, so ours works with Istio's agent at no cost with our own);
   ambient or unknown -> the ADD fails (fail closed: the runtime retries).
4. Agent unreachable -> ask the API server as Istio does (GET pod + namespace with
   ``<run_dir>/istio-cni-kubeconfig``, :mod:`cni_plugin.kube_lookup`, then
   :mod:`cni_plugin.enablement`): not ambient -> pass through (a pod that is not ambient
   never needs the agent); ambient, or the API down too -> fail closed, naming both.
5. prevResult without addresses (the chain is misordered): ask first (``GET /pod``; an
   unreachable agent as in 4): not ambient -> pass through, ambient -> a config error
   saying so, unknown -> ``POST /cmdadd`` (the agent has the pod's addresses from the API).
   No prevResult at all is the non-chained layout (Multus): an ambient pod is posted.
DEL, CHECK, STATUS and GC succeed and change nothing; VERSION lists the spec versions.
"""

from __future__ import annotations

import os
import sys

from cni_plugin import cni_spec, json_codec
from cni_plugin.cni_spec import CniError, Invocation
from cni_plugin.constants import DEFAULT_RUN_DIR, PLUGIN_LOG_SOCKET
from cni_plugin.plugin_log import PluginLog

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: ``typing`` imports ``re`` (ms per pod sandbox)
    from collections.abc import Mapping
    from typing import Any, BinaryIO, TextIO

AGENT_POD_PREFIX = "istio-cni-node-"


class _Verdict:
    AMBIENT = "ambient"
    NOT_AMBIENT = "not ambient"
    UNKNOWN = "unknown"


def _run_dir(conf: Mapping[str, Any]) -> str:
    return str(conf.get("cni_agent_run_dir") or DEFAULT_RUN_DIR)


def _ask_api(inv: Invocation, ns: str, name: str, log: PluginLog) -> tuple[str, str]:
    """(verdict, reason) from the API server; UNKNOWN when it cannot answer."""
    from cni_plugin import kube_lookup

    try:
        kc = kube_lookup.load_kubeconfig(kube_lookup.kubeconfig_path(_run_dir(inv.config)))
        pod, namespace = kube_lookup.fetch_pod_and_namespace(kc, ns, name)
    except kube_lookup.KubeconfigError as e:
        code = (
            cni_spec.ERR_TRY_AGAIN_LATER
            if e.retryable
            else cni_spec.ERR_IO
            if e.io
            else cni_spec.ERR_INVALID_CONFIG
        )
        raise CniError(code, str(e)) from None
    except kube_lookup.ApiUnavailableError as e:
        return _Verdict.UNKNOWN, f"api server unavailable: {e}"

    from cni_plugin.enablement import (
        DEFAULT_SELECTORS,
        EnablementPolicy,
        PodFacts,
        decide,
        parse_selectors,
    )
    from cni_plugin.errors import ConfigError

    meta = pod.get("metadata") or {}
    facts = PodFacts(
        namespace=ns,
        labels=meta.get("labels") or {},
        annotations=meta.get("annotations") or {},
        host_network=bool((pod.get("spec") or {}).get("hostNetwork")),
        namespace_labels=(namespace.get("metadata") or {}).get("labels") or {},
    )
    excluded = [n for n in inv.config.get("exclude_namespaces") or [] if n]
    # No key: a 1.24-style entry, the default selectors; a list (even empty) is Istio's.
    selectors = DEFAULT_SELECTORS
    if "enablement_selectors" in inv.config:
        try:
            selectors = parse_selectors(inv.config["enablement_selectors"], "enablement_selectors")
        except ConfigError as e:
            raise CniError(
                cni_spec.ERR_INVALID_CONFIG,
                f"{e} (fix ambient.enablementSelectors / AMBIENT_ENABLEMENT_SELECTOR)",
            ) from None
    policy = EnablementPolicy(excluded_namespaces=excluded, selectors=selectors)
    decision = decide(facts, policy)
    log.debug("enablement decided from the api server", decision=str(decision))
    return (_Verdict.AMBIENT if decision.enabled else _Verdict.NOT_AMBIENT), str(decision)


def cmd_add(inv: Invocation, log: PluginLog) -> dict[str, Any]:
    conf = inv.config
    prev = conf.get("prevResult")
    result = cni_spec.convert_result(prev, inv.cni_version)
    if not conf.get("ambient_enabled"):
        return result
    ns = inv.args.get("K8S_POD_NAMESPACE", "")
    name = inv.args.get("K8S_POD_NAME", "")
    if not ns or not name:
        log.debug("not a kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS)")
        return result
    log.fields["pod"] = f"{ns}/{name}"
    if ns in (conf.get("exclude_namespaces") or []):
        log.info("pod namespace excluded")
        return result
    if name.startswith(AGENT_POD_PREFIX) and ns == conf.get("pod_namespace"):
        log.info("pod is the istio-cni node agent itself, skipping")
        return result

    from cni_plugin import agent_client

    run_dir = _run_dir(conf)
    ips = agent_client.ip_configs(prev)
    if ips:
        # One round trip: the agent judges the pod from its own caches (an unknown pod
        # from the API) and enrolls it before answering; 200 for a pod that is not
        # ambient too. Only when the agent is unreachable does the plugin ask the API.
        try:
            reply = _enroll(inv, run_dir, ns, name, ips, log)
        except agent_client.AgentUnreachableError as e:
            return _agent_down(inv, ns, name, e, log, result)
        log.info("node agent answered the add", reply=reply)
        return result

    # No addresses (the chain is misordered, or the primary plugin assigns none): only the
    # agent's answer decides; unreachable, it is the same as above.
    try:
        status = agent_client.query_pod(run_dir, ns, name)
        if status is None or not status.get("known"):
            # The agent has not seen the pod: it looks it up when asked to enroll it.
            log.info("node agent answered the add", reply=_enroll(inv, run_dir, ns, name, ips, log))
            return result
    except agent_client.AgentUnreachableError as e:  # also gone between the two requests
        return _agent_down(inv, ns, name, e, log, result)
    if not status.get("ambient"):
        log.debug("pod not ambient, passing through", reason=str(status.get("reason", "")))
        return result
    if prev is None:
        # No prevResult at all: not chained (CHAINED_CNI_PLUGIN=false, Multus runs us as a
        # network of our own). Istio's plugin posts the pod with no addresses; so do we, and
        # the agent takes them from the API.
        log.info("node agent answered the add", reply=_enroll(inv, run_dir, ns, name, ips, log))
        return result
    raise CniError(
        cni_spec.ERR_INVALID_CONFIG,
        f"pod {ns}/{name} is ambient but prevResult has no IPs: istio-cni must be chained "
        "after the plugin that assigns the pod's addresses (fix the conflist order)",
    )


def _enroll(
    inv: Invocation, run_dir: str, ns: str, name: str, ips: list[Any], log: PluginLog
) -> str:
    """``POST /cmdadd``; the agent's reply text. Unreachable propagates. A refusal is
    checked against the API server: a pod that is not ambient passes (Istio's own agent
    refuses every pod it is not asked to enroll, because its plugin posts ambient pods
    only); an ambient or unknown one is a CNI error (fail closed: the runtime retries)."""
    from cni_plugin import agent_client

    body = agent_client.add_event_body(inv.netns, name, ns, ips)
    try:
        return agent_client.push_add_event(run_dir, body)
    except agent_client.AgentFailedError as e:
        refusal = e
    try:
        verdict, reason = _ask_api(inv, ns, name, log)
    except CniError as e:  # no usable kubeconfig: the agent's refusal is the answer
        verdict, reason = _Verdict.UNKNOWN, e.msg
    if verdict == _Verdict.NOT_AMBIENT:
        log.info(
            "node agent refused a pod the api server says is not ambient; passing through",
            reason=reason,
            refusal=str(refusal),
        )
        return "not enrolled: " + reason
    raise CniError(
        cni_spec.ERR_AGENT,
        f"istio-cni node agent could not enroll pod {ns}/{name}: {refusal}",
    )


def _agent_down(
    inv: Invocation,
    ns: str,
    name: str,
    agent_down: Exception,
    log: PluginLog,
    result: dict[str, Any],
) -> dict[str, Any]:
    """The agent is unreachable: a pod the API says is not ambient passes; any other
    fails closed (ambient pods must never run uncaptured; the runtime retries)."""
    log.warn("node agent unreachable; asking the api server", error=str(agent_down))
    try:
        verdict, reason = _ask_api(inv, ns, name, log)
    except CniError as e:
        e.msg = f"{e.msg} (asked because {agent_down})"
        raise
    if verdict == _Verdict.NOT_AMBIENT:
        log.debug("pod not ambient, passing through", reason=reason)
        return result
    if verdict == _Verdict.AMBIENT:
        raise CniError(
            cni_spec.ERR_TRY_AGAIN_LATER,
            f"pod {ns}/{name} is ambient but {agent_down}; failing closed so the pod never "
            "runs without redirection (the runtime retries)",
        )
    raise CniError(
        cni_spec.ERR_TRY_AGAIN_LATER,
        f"cannot tell whether pod {ns}/{name} is ambient: {reason}, and {agent_down}; "
        "failing closed until either is back (the runtime retries)",
    )


def run(env: Mapping[str, str], stdin: bytes, out: TextIO, err: TextIO) -> int:
    """One invocation. Writes exactly one result or one error JSON to ``out``."""
    log = PluginLog(stream=err)
    version = cni_spec.LATEST_VERSION
    inv: Invocation | None = None
    try:
        inv = cni_spec.parse(env, stdin)
        version = inv.cni_version
        log.set_level(str(inv.config.get("plugin_log_level") or "info"))
        if inv.container_id:
            log.fields["containerID"] = inv.container_id[:12]
        if inv.command == "VERSION":
            out.write(cni_spec.version_result(inv.config))
            return 0
        if inv.command == "ADD":
            result = cmd_add(inv, log)
            out.write(json_codec.dumps(result))
        # DEL, CHECK, STATUS, GC: nothing to undo or verify (the agent owns the pod's rules
        # and removes them when the pod goes away); they succeed with no output.
        return 0
    except CniError as e:
        log.error(f"istio-cni {env.get('CNI_COMMAND', '?')} failed: {e.msg}")
        out.write(e.to_json(e.cni_version or version))
        return 1
    except Exception as e:  # never a traceback on the runtime's stdout or stderr
        log.error(f"istio-cni internal error: {type(e).__name__}: {e}")
        out.write(
            CniError(
                cni_spec.ERR_INTERNAL, f"istio-cni internal error: {type(e).__name__}: {e}"
            ).to_json(version)
        )
        return 1
    finally:
        # Checked here so that a run with nothing to send never imports the socket code.
        if (
            inv is not None
            and log.records
            and os.path.exists(os.path.join(_run_dir(inv.config), PLUGIN_LOG_SOCKET))
        ):
            from cni_plugin import agent_client

            agent_client.push_logs(_run_dir(inv.config), log.records)


def main() -> None:
    stdin: BinaryIO = sys.stdin.buffer
    try:
        data = stdin.read()
    except OSError as e:
        data = b""
        sys.stdout.write(
            CniError(cni_spec.ERR_IO, f"cannot read the network configuration: {e}").to_json(
                cni_spec.LATEST_VERSION
            )
        )
        sys.exit(1)
    rc = run(os.environ, data, sys.stdout, sys.stderr)
    sys.stdout.flush()
    sys.exit(rc)


if __name__ == "__main__":
    main()
