"""Istio's bookinfo sample, small enough for the testbed node (see :mod:`.manifests`)."""
