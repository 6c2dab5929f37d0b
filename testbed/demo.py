"""``make demo`` = ``python -m testbed.demo [--backend iptables|nftables|ebpf]``: Istio's
ambient walkthrough, end to end, on the testbed's real single-node Kubernetes.

1. the node: API server, kubelet, containerd; our installer chains our CNI plugin after
   bridge; our agent runs; the ztunnel stand-in is connected;
2. bookinfo starts in namespace ``bookinfo``, outside the mesh;
3. ``istio-cni-agent pods`` shows PROTOCOL TCP for every pod;
4. ``kubectl label namespace bookinfo istio.io/dataplane-mode=ambient``: no restarts;
5. the table shows HBONE; the stand-in's listeners are inside productpage's namespace;
6. requests cross the mesh: access log per hop with SPIFFE ids, TLS on the wire;
7. reviews-v4, added now, is enrolled by the CNI plugin before its app starts;
8. the label is removed: TCP again, rules gone, traffic flows directly;
9. `helm uninstall`: the pod's cleanup leaves the node as before the install; then
   everything is torn down and the host is shown to be as it was.

Step 9 always runs (``finally``; SIGINT/SIGTERM/SIGHUP end the walkthrough early and are
ignored while tearing down). The node is the testbed instance ``demo``
(``icni-tb-demo``, or ``$ISTIO_CNI_TESTBED_INSTANCE``), so a node someone brought up by
hand is never touched. ``--facts FILE`` writes each step's evidence as JSON (the test
reads it); ``--keep-logs DIR`` keeps the node's logs. ``DEMO_ENROLL_TIMEOUT`` (seconds,
default 30) bounds each wait for the agent on a slow machine. Exit 0 only when every
step's facts held and nothing was left behind.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from testbed import daemonset as D
from testbed import demo_node as N
from testbed.agent_image import AgentImageError
from testbed.build import BuildError
from testbed.daemonset import DaemonSetError
from testbed.demo_ambient import AMBIENT_STEPS
from testbed.demo_cluster import DemoError
from testbed.demo_metrics import metrics_from_prometheus
from testbed.demo_node import ObservationError
from testbed.demo_steps import Walkthrough, command, heading, note, show
from testbed.images import ImageError
from testbed.layout import Layout
from testbed.mesh import MeshUnavailable
from testbed.node import BACKENDS, Testbed, TestbedError
from testbed.node_state import NodeState, differences
from testbed.prometheus import PrometheusError

INSTANCE = "demo"
STEP9 = ("helm uninstall leaves the node as before the install; then everything torn down: "
         "the host's namespaces, rules, bpffs and processes as before the demo")  # fmt: skip
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal asked the demo to stop; raised in the main thread, tears down on the way."""


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def uninstall(walk: Walkthrough) -> dict[str, Any]:
    """``helm uninstall``, then the node compared with its state before ``helm install``:
    the pod's cleanup must have removed the conflist entry, the plugin, its kubeconfig, the
    host probe rules and sets and the ebpf pins."""
    bed, before = walk.bed, walk.node_before
    command(f"helm uninstall {D.RELEASE} -n {D.helm_namespace()}")
    started = time.monotonic()
    D.uninstall(bed)
    D.wait_gone(bed)
    took = time.monotonic() - started
    if before is None:
        return {"seconds": took, "differences": {"snapshot": ["none taken before install"]}}
    diff = differences(before, NodeState.take(bed, bed.info()))
    note(f"istio-cni-node gone {took:.1f}s after helm uninstall; the node against its state "
         f"before helm install (CNI files, run dir, rules, ipsets, pins): "
         + ("identical" if not diff else "DIFFERENT"))  # fmt: skip
    for kind, lines in diff.items():
        show(f"{kind}:\n" + "\n".join(f"  {ln}" for ln in lines), 12)
    return {"seconds": round(took, 1), "differences": diff}


def _uninstall_step(walk: Walkthrough) -> dict[str, Any]:
    """:func:`uninstall` when the chart was installed; ``problem`` says what failed."""
    if not walk.installed:
        return {}
    try:
        removed = uninstall(walk)
    except (DaemonSetError, TestbedError) as e:
        return {"error": str(e), "problem": f"helm uninstall: {e}"}
    if removed["differences"]:
        removed["problem"] = f"helm uninstall left the node changed: {removed['differences']}"
    return removed


def teardown(bed: Testbed, backend: str, before: N.HostSnapshot) -> dict[str, Any]:
    """Step 9: bring the node down; compare the host with the snapshot taken before step 1.

    The ebpf backend's pins (programs, NAT map, the getsockopt link on the host's cgroup
    root) live under a pin root private to this testbed instance, named after the node
    (``Layout.bpf_pin_root``), which ``down`` removes: nothing ebpf-specific to do here."""
    print("$ istio-cni-testbed down", flush=True)
    started = time.monotonic()
    problems = bed.down()
    note(f"node down in {time.monotonic() - started:.1f}s")
    after = N.HostSnapshot.take()
    markers: tuple[str, ...] = (bed.layout.node_name, str(bed.layout.state_dir))
    left = N.leftovers(before, after, markers)
    note(
        f"ip netns: {len(after.netns)} namespaces, new ones of the demo: {left['netns'] or 'none'}"
    )
    changed = ", ".join(left["host_rules_changed"]) or "unchanged"
    note(f"host rules (iptables-save, legacy, ip6tables, nft list ruleset): {changed}")
    note(f"/sys/fs/bpf: new entries of the demo: {left['bpffs'] or 'none'}")
    if backend == "ebpf":
        pins = bed.layout.bpf_pin_root
        note(f"  the agent's pin root {pins}: {'still there' if pins.exists() else 'removed'}")
    note(f"processes of the demo still running: {left['processes'] or 'none'}")
    if problems:
        note(f"testbed down reported: {problems}")
    return {"down_problems": problems, "leftovers": left}


def _failure_context(layout: Layout) -> None:
    """The log lines that usually explain a failed step (the logs go with the node)."""
    wanted = {
        "kubelet": ("probe for",),
        "istio-cni-agent": ('"level": "error"', '"level": "warning"'),
        "ztunnel-standin": ('"level": "error"', '"level": "warning"'),
    }
    for name, needles in wanted.items():
        try:
            lines = (layout.logs_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            continue
        hits = [ln for ln in lines if any(n in ln for n in needles)][-6:]
        if hits:
            note(f"last relevant lines of {name}.log (the node's logs go with it; "
                 "--keep-logs DIR keeps them):")  # fmt: skip
            show("\n".join(ln[:300] for ln in hits))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="iptables")
    p.add_argument("--facts", help="write each step's evidence to this JSON file")
    p.add_argument("--keep-logs", help="copy the node's logs to this directory before teardown")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo: needs root (namespaces, mounts, cgroups): run it with sudo",
              file=sys.stderr)  # fmt: skip
        return 2
    layout = Layout.for_instance(os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") or INSTANCE)
    bed = Testbed(layout)
    if bed.running():
        print(f"make demo: a demo node {layout.node_name} is already running (another demo?). "
              f"Wait for it, or remove it: istio-cni-testbed --instance "
              f"{layout.node_name.removeprefix('icni-tb-')} down", file=sys.stderr)  # fmt: skip
        return 2
    started = time.monotonic()
    before = N.HostSnapshot.take()
    walk = Walkthrough(bed, args.backend)
    old = {s: signal.signal(s, _interrupt) for s in _SIGNALS}
    rc, failure = 1, ""
    try:
        steps: list[Callable[[], None]] = [
            walk.step1_node,
            walk.step2_bookinfo,
            walk.step3_table_tcp,
            walk.step4_label,
            *(functools.partial(f, walk) for f in AMBIENT_STEPS),
            functools.partial(metrics_from_prometheus, walk),
        ]
        for step in steps:
            step()
            walk.k.assert_mesh_alive()  # a crashed agent or stand-in fails the step it hit
        rc = 0
    except (DemoError, ObservationError, DaemonSetError, PrometheusError) as e:
        failure = str(e)
    except (TestbedError, MeshUnavailable, BuildError, ImageError, AgentImageError) as e:
        failure = f"the testbed could not provide the node: {e}"
    except Interrupted as e:
        failure, rc = f"interrupted ({e})", 130
    except Exception as e:  # a defect of the demo itself: still one line, still torn down
        failure = f"unexpected {type(e).__name__}: {e} (a bug in the demo: please report it)"
    finally:
        for s in _SIGNALS:  # teardown must finish: a second Ctrl-C must not cut it short
            signal.signal(s, signal.SIG_IGN)
        if failure:
            print(f"\nDEMO FAILED: {failure}", flush=True)
            _failure_context(layout)
        heading(9, STEP9)
        removed = _uninstall_step(walk)
        if removed.get("problem") and not failure:
            failure = removed["problem"]
            print(f"\nDEMO FAILED: {failure}", flush=True)
        if args.keep_logs and layout.logs_dir.exists():
            shutil.copytree(layout.logs_dir, args.keep_logs, dirs_exist_ok=True)
            pod_logs = layout.state_dir / "var-log" / "pods"
            if pod_logs.exists():
                shutil.copytree(pod_logs, Path(args.keep_logs) / "pods", dirs_exist_ok=True)
            note(f"node logs copied to {args.keep_logs}")
        end = teardown(bed, args.backend, before)
        end["uninstall"] = removed
        for s, handler in old.items():
            signal.signal(s, handler)
    left = end["leftovers"]
    clean = not end["down_problems"] and not any(left.values())
    elapsed = time.monotonic() - started
    walk.facts["9"] = end
    walk.facts["summary"] = {"backend": args.backend, "seconds": round(elapsed, 1),
                             "clean": clean, "failure": failure, "rc": rc}  # fmt: skip
    if args.facts:
        with open(args.facts, "w") as f:
            json.dump(walk.facts, f, indent=2, default=str)
    if failure and rc == 0:
        rc = 1
    if not clean:
        instance = layout.node_name.removeprefix("icni-tb-")
        print(
            f"\nLEFT BEHIND: {end['down_problems'] or left}. Remove it with: "
            f"istio-cni-testbed --instance {instance} down"
        )
        rc = rc or 1
    print(f"\n{'demo OK' if rc == 0 else 'demo FAILED'} ({args.backend} backend) in {elapsed:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
