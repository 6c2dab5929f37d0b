"""The istio-cni node agent: Kubernetes watch, enrolment, plugin events, ZDS, health, CLI."""
