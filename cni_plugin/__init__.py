"""istio-cni in Python: the CNI plugin (stdlib only) and the in-pod redirection backends.

Modules imported by the plugin executable (``plugin``, ``constants``, ``enablement``,
``label_selector``, ``errors``) must stay stdlib-only: the plugin starts once per pod sandbox
on hosts that may have nothing else. The redirection backends (``cni_plugin.redirection``)
run in the agent.
"""
