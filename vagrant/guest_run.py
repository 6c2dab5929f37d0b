"""One run of the test suite on one kernel: a virtme-ng guest under qemu TCG, or the host.

The guest boots the cached kernel over this machine's root filesystem (read-only; /etc,
/var, /tmp are copy-on-write, /run is fresh), so it sees this checkout and its ``.venv``.
A shell script written into the run's output directory (the guest's one writable host
directory) loads the kernel modules the backends need, mounts bpffs, runs pytest with
JUnit output and writes pytest's exit code to ``rc``: vng itself always exits 255 here,
and the guest's console output does not reach a pipe, so files are the only channel back.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from vagrant.kernel_cache import CachedKernel
from vagrant.results import KernelResult, read_junit, read_progress

# Loaded up front so a missing one shows in the summary rather than as an odd test error.
# Netfilter pieces cover Istio's rules (mark, connmark, conntrack/CT zones, REDIRECT, TPROXY,
# owner, set, SNAT) in both the nft and legacy iptables front ends; tc/BPF pieces the eBPF
# backend.
GUEST_MODULES = (
    "veth", "dummy",
    "nf_tables", "nft_compat", "nft_chain_nat", "nft_ct", "nft_nat", "nft_redir",
    "nft_tproxy", "nft_socket", "nft_fib_inet", "nf_conntrack", "nf_nat", "nf_conntrack_netlink",
    "nf_tproxy_ipv4", "nf_tproxy_ipv6", "nf_socket_ipv4", "nf_socket_ipv6",
    "ip_tables", "ip6_tables", "iptable_filter", "iptable_nat", "iptable_mangle",
    "iptable_raw", "ip6table_filter", "ip6table_nat", "ip6table_mangle", "ip6table_raw",
    "xt_mark", "xt_connmark", "xt_conntrack", "xt_CT", "xt_REDIRECT", "xt_TPROXY",
    "xt_owner", "xt_set", "xt_tcpudp", "xt_nat", "xt_MASQUERADE", "xt_socket",
    "xt_comment", "xt_multiport", "xt_addrtype", "ip_set", "ip_set_hash_ip",
    "ip_set_hash_net", "sch_ingress", "cls_bpf", "act_bpf",
)  # fmt: skip

DEFAULT_TIMEOUT = 3600.0
# Measured: Python-heavy tests run 10-15x slower in the TCG guest than on the host.
TIME_SCALE = 12
# pytest-timeout's per-test limit inside the guest (the project's own is 300 s on the host).
GUEST_TEST_TIMEOUT = 1200
FAST_TAG = "icnifast"


def guest_script(repo: Path, out: Path, pytest_args: list[str]) -> str:
    python = repo / ".venv" / "bin" / "python"
    pytest = shlex.join(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "--junitxml",
         str(out / "junit.xml"), "-p", "vagrant.guest_plugin",
         f"--timeout={GUEST_TEST_TIMEOUT}", *pytest_args]
    )  # fmt: skip
    q = shlex.quote
    # The host root arrives over 9p without caching: every Python import costs many round
    # trips (importing pyroute2 took 35-65 s). A second, read-only export mounted with
    # cache=loose is laid over the trees Python reads and the tools and libraries the tests
    # run hundreds of times (ip, iptables, nft); the rw results dir is put back on top.
    fast_dirs = [
        f"/usr/lib/python3.{sys.version_info.minor}",
        "/usr/lib/python3",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/bin",
        "/usr/sbin",
        str(repo),
    ]
    move_out = out.is_relative_to(repo)
    binds = "\n".join(f"  [ -d $fast{q(d)} ] && mount --bind $fast{q(d)} {q(d)}" for d in fast_dirs)
    return f"""#!/bin/sh
exec >{q(str(out / "guest.log"))} 2>&1
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "guest kernel: $(uname -r)"
echo "guest cmdline: $(cat /proc/cmdline)"
echo "guest uptime at start: $(up) s"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || echo "bpffs mount failed"
modprobe -a {" ".join(GUEST_MODULES)} 2>&1 | sed -n 's/.*Module \\([^ ]*\\) not found.*/\\1/p' \
  > {q(str(out / "modules-missing"))}
echo "modules loaded at uptime: $(up) s"
fast=/run/icni-fast
mkdir -p $fast
if mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=524288 {FAST_TAG} $fast; then
  {"mkdir -p /run/icni-out && mount --move " + q(str(out)) + " /run/icni-out" if move_out else ":"}
{binds}
  echo "cached view of the host filesystem under: {" ".join(fast_dirs)}"
  {"mount --bind /run/icni-out " + q(str(out)) if move_out else ":"}
else
  echo "no cached view of the host filesystem: running over plain 9p (slow)"
fi
cd {q(str(repo))}
export PYTHONDONTWRITEBYTECODE=1
# Everything runs ~10x slower under TCG: tests with fixed deadlines may scale by this.
export ICNI_TEST_TIME_SCALE={TIME_SCALE}
export ICNI_VM_PROGRESS={q(str(out / "progress.jsonl"))}
{pytest}
rc=$?
echo "pytest done at uptime: $(up) s"
echo $rc > {q(str(out / "rc"))}
"""


def _fresh_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("rc", "junit.xml", "progress.jsonl", "guest.log", "modules-missing", "vng.log",
                 "guest.sh"):  # fmt: skip
        (out / name).unlink(missing_ok=True)


def _collect(result: KernelResult, out: Path) -> KernelResult:
    rc_file = out / "rc"
    if rc_file.is_file() and rc_file.read_text().strip().lstrip("-").isdigit():
        result.exit_code = int(rc_file.read_text().strip())
    missing = out / "modules-missing"
    if missing.is_file():
        result.missing_modules = missing.read_text().split()
    junit, progress = out / "junit.xml", out / "progress.jsonl"
    if junit.is_file():
        read_junit(junit, result)
    elif progress.is_file():
        read_progress(progress, result)
        result.error = (
            f"{result.error + ': ' if result.error else ''}pytest did not finish; counts are "
            f"the {result.totals.total} tests that did"
        )
    if result.exit_code is None and not result.error:
        result.error = f"the guest wrote no exit code; see {out}/guest.log and {out}/vng.log"
    elif result.exit_code == 5:
        result.error = "pytest collected no tests"
    return result


def _run_bounded(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> str:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (qemu too)."""
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f} s"
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return ""


def run_in_guest(
    kernel: CachedKernel,
    repo: Path,
    out: Path,
    pytest_args: list[str],
    *,
    cpus: int = 2,
    memory: str = "2G",
    timeout: float = DEFAULT_TIMEOUT,
    nice: int = 19,
    kernel_args: tuple[str, ...] = (),
) -> KernelResult:
    """Boot ``kernel`` under qemu TCG and run pytest with ``pytest_args`` inside;
    ``kernel_args`` are added to the kernel's command line (``ipv6.disable=1``)."""
    out, repo = out.resolve(), repo.resolve()
    _fresh_out(out)
    script = out / "guest.sh"
    script.write_text(guest_script(repo, out, pytest_args))
    venv_bin = repo / ".venv" / "bin"
    vng = venv_bin / "vng"
    if not vng.is_file():
        return KernelResult(
            kernel.release, "qemu-tcg", None, 0.0, error=f"{vng} is missing: run `make setup`"
        )
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    cmd = [
        # Low priority by default: qemu TCG is CPU-bound and the machine is shared.
        "nice",
        "-n",
        str(nice),
        str(vng),
        "--run",
        str(kernel.vmlinuz),
        "--disable-kvm",
        "--cpus",
        str(cpus),
        "--memory",
        memory,
        # /var/cache is a fresh tmpfs in the guest: bring the kernel's modules back in.
        "--rodir",
        str(kernel.root.parent),
        "--rwdir",
        str(out),
        "--cwd",
        str(repo),
        "--exec",
        f"sh {shlex.quote(str(script))}",
        # One token: vng would read a separate "-virtfs ..." as an option of its own.
        f"--qemu-opts=-virtfs local,path=/,mount_tag={FAST_TAG},security_model=none,"
        "readonly=on,multidevs=remap",
    ]
    for arg in kernel_args:
        cmd += ["--append", arg]
    start = time.monotonic()
    error = _run_bounded(cmd, out / "vng.log", timeout, env)
    result = KernelResult(kernel.release, "qemu-tcg", None, time.monotonic() - start, error=error)
    return _collect(result, out)


def run_on_host(
    repo: Path, out: Path, pytest_args: list[str], timeout: float = DEFAULT_TIMEOUT
) -> KernelResult:
    """The same pytest run on the host's own kernel, for comparison."""
    _fresh_out(out)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--junitxml",
        str(out / "junit.xml"),
        *pytest_args,
    ]
    start = time.monotonic()
    with (out / "guest.log").open("wb") as f:
        try:
            rc: int | None = subprocess.run(
                cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    (out / "rc").write_text(f"{rc}\n" if rc is not None else "")
    result = KernelResult(os.uname().release, "host", None, time.monotonic() - start)
    return _collect(result, out)
