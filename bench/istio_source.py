"""Istio's source tree for one ``istio.io/istio`` version, in Go's module cache, for tests
that compare with files Istio ships (its Helm chart ``manifests/charts/istio-cni``).

Role: ``ensure_source(version)`` returns the directory of the module's source, running
``go mod download -json istio.io/istio@<version>`` first when it is not cached yet (a
12 MB zip, seconds). Nothing of Istio's is copied into this repository: tests read it from
the module cache, where the Istio peer build (:mod:`bench.istio_peer`) finds it too.

Invariants:
- The machine's configured ``GOPROXY`` and ``GOMODCACHE`` are used as they are (the same
  cache ``bench.istio_peer`` builds from); no address is written anywhere.
- ``GOTOOLCHAIN=local``, ``GOWORK=off``; the command runs in a scratch directory outside
  any module, so no ``go.mod`` of ours is read or touched.
- Every failure is one :class:`~bench.istio_peer.PeerBuildError` line naming the problem
  and the fix (the peer build's own explanations).

``python -m bench.istio_source [--version V]`` prints the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.istio_peer import DEFAULT_VERSION, MODULE, PeerBuildError, explain_go_failure

CHART = "manifests/charts/istio-cni"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", GOWORK="off", GOFLAGS="-mod=mod")
    return env


def ensure_source(version: str = DEFAULT_VERSION) -> Path:
    """The module's source directory (read-only, in Go's module cache), downloaded once."""
    with tempfile.TemporaryDirectory(prefix="icni-istio-src-") as scratch:
        try:
            proc = subprocess.run(
                ["go", "mod", "download", "-json", f"{MODULE}@{version}"],
                cwd=scratch, env=_go_env(), capture_output=True, text=True, timeout=900,
            )  # fmt: skip
        except FileNotFoundError:
            raise PeerBuildError("go not found on PATH: install Go 1.26 (make setup)") from None
        except subprocess.TimeoutExpired:
            raise PeerBuildError(
                f"go mod download {MODULE}@{version} took over 15 min: check GOPROXY / network"
            ) from None
    try:
        info = json.loads(proc.stdout or "{}")
    except ValueError:
        info = {}
    if proc.returncode != 0 or info.get("Error") or not info.get("Dir"):
        raise PeerBuildError(explain_go_failure(version, str(info.get("Error") or proc.stderr)))
    return Path(info["Dir"])


def ensure_chart(version: str = DEFAULT_VERSION) -> Path:
    """Istio's istio-cni Helm chart directory of ``version``."""
    chart = ensure_source(version) / CHART
    if not (chart / "values.yaml").is_file():
        raise PeerBuildError(
            f"{MODULE}@{version} has no {CHART}/values.yaml: pick a version that ships the "
            "istio-cni chart"
        )
    return chart


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default=DEFAULT_VERSION)
    args = p.parse_args(argv)
    try:
        print(ensure_source(args.version))
    except PeerBuildError as e:
        print(f"istio source: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
