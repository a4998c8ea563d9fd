"""The test control plane itself: it starts, answers with RBAC on, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..controlplane import CommandError, ControlPlane


def test_a_control_plane_stops_without_orphans(control_plane: ControlPlane) -> None:
    if control_plane.external:
        pytest.skip("an existing cluster is in use: no local control plane to start")
    plane = ControlPlane().start()
    pids = [proc.pid for proc in plane._procs.values()]
    workdir = plane.workdir
    assert workdir is not None and plane.kubeconfig.exists()
    assert {"etcd", "kube-apiserver"} <= set(plane._procs)
    assert plane.startup_seconds > 0
    # RBAC is on: an unknown user may do nothing, the admin may do anything.
    with pytest.raises(CommandError, match="no"):  # kubectl exits 1 for "no"
        plane.kubectl("auth", "can-i", "create", "pods", "--as=nobody")
    assert plane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    plane.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived stop()"
    assert not workdir.exists()
