"""Installer: plugin binary copy, kubeconfig, conflist merge, watch; plus manifests."""
