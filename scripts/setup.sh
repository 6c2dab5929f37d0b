#!/usr/bin/env bash
# One idempotent setup step for a fresh machine: Debian packages, the kernel-header links bcc
# needs, and a Python 3.11 venv (.venv) that imports Debian's bcc/nftables beside pip packages.
# When everything is already in place it only compares two stamps and exits within seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv"
python=${PYTHON:-python3.11}

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it installs Debian packages and touches /lib/modules); re-run with sudo"
  exit 1
fi

# --- Debian packages -------------------------------------------------------------------------
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/apt-packages.txt scripts/apt-packages.d/*.txt 2>/dev/null | tr -d ' ' | sort -u)
if ! command -v apt-get >/dev/null && command -v dnf >/dev/null; then
  # RHEL family (vagrant/Vagrantfile): the same list through a Debian -> RHEL name map.
  bash vagrant/rhel-packages.sh "${wanted[@]}"
  wanted=()
fi
for i in "${!wanted[@]}"; do
  # Ubuntu has no linux-headers-amd64 meta package: the running kernel's headers instead.
  if [ "${wanted[$i]}" = linux-headers-amd64 ] && grep -qx 'ID=ubuntu' /etc/os-release; then
    wanted[$i]="linux-headers-$(uname -r)"
  fi
done
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for bcc: /lib/modules/$(uname -r)/{build,source} ---------------------------
kver=$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$hdr" ]; then
  common="${hdr%-amd64}-common"
  mkdir -p "/lib/modules/$kver"
  [ -e "/lib/modules/$kver/build" ] || ln -sfn "$hdr" "/lib/modules/$kver/build"
  [ -e "/lib/modules/$kver/source" ] || ln -sfn "$common" "/lib/modules/$kver/source"
elif [ ! -e "/lib/modules/$kver/build" ]; then
  log "warning: no kernel headers for $kver; the eBPF backend will be unavailable"
fi

# --- bpffs, needed to pin eBPF objects --------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "warning: could not mount bpffs at /sys/fs/bpf"
fi

# --- Python venv ------------------------------------------------------------------------------
stamp="$venv/.setup-stamp"
want_stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  if ! command -v "$python" >/dev/null; then
    python=/usr/bin/python3.11
  fi
  log "building venv at $venv with $($python --version)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Debian's bcc and nftables bindings are pure Python over ctypes: appending dist-packages
  # (after the venv's own site-packages, so pip's packages win) makes them importable.
  echo /usr/lib/python3/dist-packages > "$site/debian-dist-packages.pth"
  # The machine's pip config may name local indexes that are absent; their warnings are noise.
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want_stamp" > "$stamp"
fi

# ZDS bindings: regenerated from node_agent/zds.proto only when they changed (fast).
if [ -x scripts/gen-proto.sh ]; then scripts/gen-proto.sh; fi
log "ready ($venv)"
