"""Fleet credentials: a fleet CA, per-identity client certificates, and the broker's ACL.

The broker (mosquitto) requires a client certificate signed by the fleet CA and takes the
certificate's common name as the MQTT username (``use_identity_as_username``) and as the client
id (``use_username_as_clientid``), so a device can neither claim another's identity nor take over
its session by choosing a client id. Each identity therefore holds one session at a time: a
control-plane replica runs every tenant on one session, and replicas need identities of their own. The ACL is generated from the enrolled
identities, never edited by hand:

* a device may only read its own ``desired``, ``commands`` and ``acks`` (never write them: a stolen device
  certificate cannot give its device orders) and its own ``status`` (to answer a late Last Will
  of an earlier connection), only write its own ``reported``, ``status``,
  ``telemetry``, ``fetch``, ``replies`` and ``bridge``, and read ``autoglm/v1/{tenant}/blobs/#``; nothing
  else, so it cannot leave retained messages on made-up sub-topics either;
* a cloud identity may read and write everything under ``autoglm/v1/``.

Layout of the PKI folder (default ``$AUTOGLM_HOME/fleet-pki``)::

    ca.key (0600)  ca.crt  identities.json  acl
    issued/{name}/{name}.key (0600) {name}.crt ca.crt

Device ids are the certificate CN, so they must be unique across tenants on one broker;
enrolling one that another tenant already has is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError
from shared.ids import is_valid_name
from shared.topics import PROTOCOL_VERSION, Topics

Role = Literal["device", "cloud"]
CA_DAYS = 3650


@dataclass(frozen=True)
class Identity:
    name: str  # the certificate CN = the MQTT username
    role: Role
    tenant: str | None  # None for a cloud identity (all tenants)


@dataclass(frozen=True)
class Issued:
    name: str
    folder: Path
    key: Path
    cert: Path
    ca: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FleetPKI:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key_path = root / "ca.key"
        self.ca_cert_path = root / "ca.crt"
        self.acl_path = root / "acl"
        self._identities_path = root / "identities.json"

    # -- the CA --------------------------------------------------------------------------------
    def ensure_ca(self, organization: str = "Open-AutoGLM fleet") -> bool:
        """Create the CA on first use; True when it was created now."""
        if self.ca_cert_path.is_file() and self.ca_key_path.is_file():
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, "autoglm fleet CA"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(
            self.ca_key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        self.ca_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._save_identities([])
        return True

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.ca_key_path.is_file():
            raise ConfigError("no fleet CA here yet; enroll an identity first", path=str(self.root))
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the fleet CA key is not an EC key", path=str(self.ca_key_path))
        return key, x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    # -- certificates --------------------------------------------------------------------------
    def issue(
        self, name: str, *, server_names: list[str] | None = None, days: int = 825, out: Path | None = None
    ) -> Issued:
        """A key and a certificate with CN=``name``, signed by the fleet CA, in ``out``.

        ``server_names`` makes it a server certificate (DNS names / IP addresses as SANs)."""
        self.ensure_ca()
        ca_key, ca_cert = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
            ca_key, hashes.SHA256()
        )
        folder = out or self.root / "issued" / name
        folder.mkdir(parents=True, exist_ok=True)
        issued = Issued(name, folder, folder / f"{name}.key", folder / f"{name}.crt", folder / "ca.crt")
        _write_private(
            issued.key,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.ca.write_bytes(self.ca_cert_path.read_bytes())
        return issued

    # -- identities and the ACL -----------------------------------------------------------------
    def identities(self) -> list[Identity]:
        if not self._identities_path.is_file():
            return []
        raw = json.loads(self._identities_path.read_text())
        return [Identity(i["name"], i["role"], i.get("tenant")) for i in raw]

    def _save_identities(self, identities: list[Identity]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            self._identities_path,
            json.dumps([i.__dict__ for i in sorted(identities, key=lambda i: i.name)], indent=2) + "\n",
        )
        _atomic_write(self.acl_path, acl_text(identities))

    def enroll(self, name: str, *, role: Role, tenant: str | None, out: Path | None = None) -> Issued:
        """Issue a client certificate for a device (of ``tenant``) or a cloud identity, and
        rewrite the ACL with it. Enrolling an identity again issues it a fresh certificate."""
        if not is_valid_name(name):
            raise ConfigError("names are letters, digits, '.', '_' and '-'", name=name)
        if role == "device" and (tenant is None or not is_valid_name(tenant)):
            raise ConfigError("a device needs a valid tenant", tenant=tenant)
        self.ensure_ca()
        identities = self.identities()
        for other in identities:
            if other.name == name and (other.role, other.tenant) != (
                role,
                tenant if role == "device" else None,
            ):
                raise ConfigError(
                    f"{name!r} is already enrolled as {other.role}"
                    + (f" of tenant {other.tenant!r}" if other.tenant else "")
                    + "; certificate names are broker usernames and must be unique",
                    name=name,
                )
        identity = Identity(name, role, tenant if role == "device" else None)
        self._save_identities([i for i in identities if i.name != name] + [identity])
        return self.issue(name, out=out)


# What a device does with its own topics (DESIGN.md §4): it is told, it tells.
# It reads its own status too: to answer a late Last Will of an earlier connection with ``online``.
DEVICE_READS = ("desired", "commands", "acks", "status")
# ``bridge``: its node's broker bridge says there whether it is connected (shared/topics.py).
DEVICE_WRITES = ("reported", "status", "telemetry", "fetch", "replies", "bridge")


def acl_text(identities: list[Identity]) -> str:
    """The mosquitto ACL for these identities (usernames are certificate CNs)."""
    lines = [
        "# Generated by `autoglm fleet enroll`; do not edit (it is rewritten on every enrolment).",
        "# Usernames are client-certificate common names (use_identity_as_username).",
        "",
    ]
    for i in sorted(identities, key=lambda i: (i.role, i.tenant or "", i.name)):
        lines.append(f"user {i.name}")
        if i.role == "cloud" or i.tenant is None:
            lines.append(f"topic readwrite autoglm/{PROTOCOL_VERSION}/#")
        else:
            topics = Topics(i.tenant)
            lines += [f"topic read {topics.device(i.name, c)}" for c in DEVICE_READS]
            lines += [f"topic write {topics.device(i.name, c)}" for c in DEVICE_WRITES]
            lines.append(f"topic read {topics.root}/blobs/#")
        lines.append("")
    return "\n".join(lines)


def broker_tls_lines(
    cafile: Path | str, certfile: Path | str, keyfile: Path | str, acl_file: Path | str
) -> list[str]:
    """The mosquitto directives that make a listener TLS-only with per-identity ACLs."""
    return [
        f"cafile {cafile}",
        f"certfile {certfile}",
        f"keyfile {keyfile}",
        "require_certificate true",
        "use_identity_as_username true",
        # The client id becomes the certificate's name too: a device connecting with another's
        # id cannot disconnect it (it only replaces its own session).
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        f"acl_file {acl_file}",
    ]
