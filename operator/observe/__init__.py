"""Reading what the cluster shows (KubeRay's objects, pods, run reports) into typed values. Pure."""
