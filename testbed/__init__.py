"""A real single-node Kubernetes on one machine, and a ztunnel stand-in speaking ZDS."""
