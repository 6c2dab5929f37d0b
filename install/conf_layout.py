"""Where the istio-cni network config goes, and in what form (pure, no I/O).

Three layouts, with Istio's names and behaviour (``cni/pkg/install/cniconfig.go``,
``install.go``):

- **chained** (``CHAINED_CNI_PLUGIN=true``, the default): the entry is merged into the
  primary config in place (:func:`install.conflist.merge`). The file keeps its own mode.
- **Istio-owned** (``ISTIO_OWNED_CNI_CONFIG=true``, chained and ambient only): the primary
  config is left untouched; the merge of it and our entry is written to a file of ours,
  ``ISTIO_OWNED_CNI_CONF_FILENAME`` (default ``02-istio-cni.conflist``), which must sort
  before every other config so the runtime picks it. The primary is ``CNI_CONF_NAME`` or
  the first valid config other than ours.
- **standalone** (``CHAINED_CNI_PLUGIN=false``: Multus, ``provider: multus`` on
  OpenShift): the entry alone, as a network config of its own (``cniVersion`` 0.3.1), in
  ``CNI_CONF_NAME`` or ``YYY-istio-cni.conf``; Multus runs it for the pods that attach it.

Files we create (the last two) get Istio's ``CNIConfFileMode``: 0600, or 0640 with
``CNI_CONF_GROUP_READ=true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from install import conflist

OWNED_DEFAULT_NAME = "02-istio-cni.conflist"
STANDALONE_DEFAULT_NAME = "YYY-istio-cni.conf"
STANDALONE_VERSION = "0.3.1"
MODE_DEFAULT = 0o600
MODE_GROUP_READ = 0o640

CHAINED = "chained"
OWNED = "istio-owned"
STANDALONE = "standalone"


def layout(*, chained: bool, istio_owned: bool, ambient_enabled: bool) -> str:
    """Istio's ``useIstioOwnedCNIConfig``: owned only when chained and ambient too."""
    if not chained:
        return STANDALONE
    return OWNED if istio_owned and ambient_enabled else CHAINED


def created_file_mode(group_read: bool) -> int:
    return MODE_GROUP_READ if group_read else MODE_DEFAULT


def standalone_config(entry: conflist.PluginEntry) -> bytes:
    """The entry as a network config of its own, in the field order Istio's installer
    writes it (its plugin ``Config`` struct, marshalled without sorting)."""
    body = entry.to_dict()
    ordered: dict[str, Any] = {
        "cniVersion": STANDALONE_VERSION,
        "name": body.pop("name"),
        "type": body.pop("type"),
        "ipam": body.pop("ipam"),
        "dns": body.pop("dns"),
    }
    for key in (
        "plugin_log_level",
        "cni_agent_run_dir",
        "ambient_enabled",
        "enablement_selectors",
        "exclude_namespaces",
        "pod_namespace",
        "native_nftables",
    ):
        if key in body:
            ordered[key] = body.pop(key)
    ordered.update(body)  # anything newer, after the fields Istio orders
    return conflist.dumps(ordered, sort_keys=False)


def is_standalone_entry(data: bytes, filename: str) -> bool:
    try:
        obj = conflist.loads(data, filename)
    except conflist.ConflistError:
        return False
    return isinstance(obj, dict) and conflist.is_istio(obj)


def primary_for_owned(files: Mapping[str, bytes], owned_name: str) -> str | None:
    """The primary config an Istio-owned file copies: the first valid one that is not it."""
    return conflist.choose({n: d for n, d in files.items() if n != owned_name})


def owned_priority_problem(files: Mapping[str, bytes], owned_name: str) -> str | None:
    """Why the runtime would not pick our owned file first (another valid config sorts
    before it), or None."""
    first = conflist.choose(files)
    if first is not None and first != owned_name and first < owned_name:
        return (
            f"Istio-owned CNI config {owned_name} sorts after {first}: the runtime uses "
            f"{first} and pods bypass the mesh; choose an ISTIO_OWNED_CNI_CONF_FILENAME "
            f"(Helm: istioOwnedCNIConfigFileName) that sorts first, e.g. 00-istio-cni.conflist"
        )
    return None
