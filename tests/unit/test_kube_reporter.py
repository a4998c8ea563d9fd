"""The run's reporter client: the pod's service account through the kubernetes package, straight to the API server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.config.incluster_config
import pytest
from kubetune.runtime.contract.report import Stage
from kubetune.runtime.reporting.kube_reporter import ConfigMapReporter, in_cluster_api


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pod's environment: the service's address and the mounted token and CA (test files)."""
    (tmp_path / "token").write_text("token-1")  # as the kubelet writes it: no newline
    (tmp_path / "ca.crt").write_text("not read until a connection is made\n")
    module = kubernetes.config.incluster_config
    monkeypatch.setattr(module, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(module, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return tmp_path


def test_the_pods_service_account_is_used_straight_without_retries_below_the_reporters(
    service_account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # for the model hub, not the cluster
    configuration = in_cluster_api().api_client.configuration
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.get_api_key_with_prefix("BearerToken") == "bearer token-1"
    assert configuration.ssl_ca_cert == str(service_account / "ca.crt")
    assert configuration.proxy is None and configuration.retries == 0


def test_outside_a_pod_the_error_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kubernetes.config.ConfigException, match="Service host/port is not set"):
        in_cluster_api()


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def patch_namespaced_config_map(self, *args: Any, **options: Any) -> None:
        self.calls += 1
        raise kubernetes.client.ApiException(
            status=403, reason="Forbidden", body='{"kind":"Status","message":"configmaps \\"r\\" is forbidden"}'
        )


def test_a_refused_write_is_logged_with_the_servers_message_after_bounded_attempts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    api = Refusing()
    with caplog.at_level(logging.WARNING):
        ConfigMapReporter(api, "r", "ns").stage_started(Stage.TRAIN)  # a stage change: written with retries
    assert api.calls == 3
    assert caplog.messages[-1] == 'cannot write the run report to ns/r: 403 Forbidden: configmaps "r" is forbidden'
