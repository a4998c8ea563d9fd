"""Throwaway certificates of a test cluster, made with the `openssl` command.

One CA signs the API server's serving certificate (with the addresses it is
reached by), client certificates (the subject names the user and groups) and,
for a real node, the kubelet's serving certificate. The service-account key
signs the tokens the API server issues.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_EXTENSIONS = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kubetune
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""
_SERVER_EXTENSION = """\
[{name}]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {names}
"""
_NEW_KEY = "-config openssl.cnf -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


class PkiError(RuntimeError):
    """openssl failed; the message holds its output."""


@dataclass(frozen=True)
class ServingCertificate:
    """A serving certificate: its subject and the addresses and DNS names it is valid for."""

    subject: str
    addresses: Sequence[str] = ("127.0.0.1",)
    dns_names: Sequence[str] = ("localhost",)

    def alt_names(self) -> str:
        return ",".join([*(f"IP:{a}" for a in self.addresses), *(f"DNS:{d}" for d in self.dns_names)])


def _openssl(args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args.split()], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise PkiError(f"openssl {args} exited {proc.returncode}\n{proc.stdout}{proc.stderr}".rstrip())


def make_pki(
    pki: Path, servers: Mapping[str, ServingCertificate], clients: Mapping[str, str], *, ca_name: str = "kubetune"
) -> Path:
    """`<name>.crt`/`<name>.key` for every server and client (name → subject), `ca.crt`, and `sa.key`."""
    pki.mkdir(mode=0o700, parents=True)
    config = _EXTENSIONS + "".join(
        _SERVER_EXTENSION.format(name=f"server_{name}", names=cert.alt_names()) for name, cert in servers.items()
    )
    (pki / "openssl.cnf").write_text(config)
    _openssl(f"req -x509 {_NEW_KEY} -extensions ca -keyout ca.key -out ca.crt -subj /CN={ca_name}-test-ca -days 7", pki)
    signed = [(name, cert.subject, f"server_{name}") for name, cert in servers.items()]
    signed += [(name, subject, "client") for name, subject in clients.items()]
    for name, subject, extension in signed:
        _openssl(f"req -new {_NEW_KEY} -keyout {name}.key -out {name}.csr -subj {subject}", pki)
        serial = int.from_bytes(os.urandom(8))
        _openssl(
            f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -days 7 -set_serial {serial}"
            f" -extfile openssl.cnf -extensions {extension} -out {name}.crt",
            pki,
        )
    _openssl("genrsa -out sa.key 2048", pki)
    return pki


def write_kubeconfig(path: Path, server: str, pki: Path, client: str, *, cluster: str = "kubetune") -> Path:
    """A kubeconfig for `server` as the client certificate `client` of `pki`, readable by its owner only."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n"
        f"    certificate-authority: {pki / 'ca.crt'}\n"
        f"users:\n- name: {client}\n  user:\n"
        f"    client-certificate: {pki / f'{client}.crt'}\n    client-key: {pki / f'{client}.key'}\n"
        f"contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n"
        f"    user: {client}\ncurrent-context: {cluster}\n"
    )
    path.chmod(0o600)
    return path
