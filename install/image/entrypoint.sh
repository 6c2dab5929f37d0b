#!/bin/sh
# Entry point of the istio-cni-node image: `istio-cni-entrypoint run` = `istio-cni-agent run`.
# bcc (the ebpf backend) compiles against /lib/modules/$(uname -r)/build, and the node's
# kernel release is only known here: link the image's Debian kernel headers under it
# unless the node's own are mounted there. Harmless for the other backends.
set -e
rel=$(uname -r)
if [ ! -e "/lib/modules/$rel/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$hdr" ]; then
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$hdr" "/lib/modules/$rel/build"
    ln -sfn "${hdr%-amd64}-common" "/lib/modules/$rel/source"
  fi
fi
exec istio-cni-agent "$@"
