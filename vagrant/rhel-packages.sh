#!/usr/bin/env bash
# The package step of scripts/setup.sh on the RHEL family (Rocky/Alma 9, the Vagrant VM):
# install, with dnf, the equivalents of the Debian packages named on the command line (the
# project's apt lists), then make the distribution's bcc and nftables Python bindings visible
# where the venv looks for them (/usr/lib/python3/dist-packages, Debian's path).
# Debian names with no RHEL equivalent here are listed, not fatal: the netns suite needs only
# the networking core, and a backend whose pieces are missing is skipped with the reason.
# Untested on this project's Debian machine; written against Rocky Linux 9's repositories.
set -euo pipefail
log() { printf 'setup (rhel): %s\n' "$*" >&2; }

kver=$(uname -r)
declare -A map=(
  [iptables]=iptables-nft [nftables]=nftables [ipset]=ipset [iproute2]=iproute
  [conntrack]=conntrack-tools [kmod]=kmod [procps]=procps-ng [psmisc]=psmisc
  [tcpdump]=tcpdump [iputils-ping]=iputils [netcat-openbsd]=nmap-ncat
  [python3-venv]="python3.11 python3.11-pip" [python3-bpfcc]=python3-bcc
  [bpfcc-tools]=bcc-tools [python3-nftables]=python3-nftables
  [linux-headers-amd64]="kernel-devel-$kver" [containernetworking-plugins]=containernetworking-plugins
  [util-linux]=util-linux [make]=make
)
want=() unknown=()
for p in "$@"; do
  case "${map[$p]-?}" in
    "?") unknown+=("$p") ;;
    -) ;;
    *) read -ra names <<< "${map[$p]}"; want+=("${names[@]}") ;;
  esac
done
[ ${#unknown[@]} -eq 0 ] || log "no RHEL name known for: ${unknown[*]} (skipped)"

missing=()
for p in "${want[@]}"; do rpm -q "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # --skip-broken: an old box may lack kernel-devel for its exact kernel; the eBPF backend
  # then reports itself unavailable instead of the whole setup failing.
  dnf install -y -q --skip-broken "${missing[@]}" >/dev/null
  [ -e "/lib/modules/$kver/build" ] || log "kernel-devel-$kver not installable: eBPF unavailable (dnf update kernel, reboot)"
fi

# bcc and nftables bindings are pure Python over ctypes; the venv's .pth names Debian's path.
mkdir -p /usr/lib/python3/dist-packages
for mod in bcc nftables; do
  src=$(ls -d /usr/lib/python3*/site-packages/"$mod" /usr/lib64/python3*/site-packages/"$mod" 2>/dev/null | head -n 1 || true)
  if [ -n "$src" ]; then
    ln -sfn "$src" "/usr/lib/python3/dist-packages/$mod"
  else
    log "no Python module $mod from the distribution"
  fi
done
