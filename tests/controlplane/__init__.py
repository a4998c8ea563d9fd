"""A real Kubernetes API server for the kubetune tests, without containers."""

from .controlplane import CommandError, ControlPlane, build, kuberay_crds, process_cpu_seconds

__all__ = ["CommandError", "ControlPlane", "build", "kuberay_crds", "process_cpu_seconds"]
