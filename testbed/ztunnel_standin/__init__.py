"""A ztunnel stand-in for the testbed: real ZDS client, real listeners inside pods.

It connects to the node agent's ZDS socket like ztunnel (``zds_client``), keeps ztunnel's
workload rules (``workloads``), and for each pod opens 15001/15006/15008/15053 inside the
pod's network namespace and carries real traffic (``pod_proxy``): HBONE between enrolled
pods as mutual TLS with SPIFFE certificates from a testbed CA (``identity``), one JSON
access-log line per connection (``access_log``). Run: ``python -m testbed.ztunnel_standin``.
"""
