"""A throw-away PKI for the TLS tests: a CA, leaf certificates it signed, and a rogue CA.

Made with the ``cryptography`` package in the test's temporary folder; every leaf certificate
names localhost and 127.0.0.1, so clients can dial the services by address.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class CertPair:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    """A CA, certificates it signed (scheduler, worker, client) and a rogue CA's certificate."""

    ca: str
    scheduler: CertPair  # CN "scheduler"
    worker: CertPair  # CN "worker"
    intruder: CertPair  # CN "intruder", signed by the same CA
    rogue_ca: str
    rogue: CertPair  # CN "scheduler", but signed by another CA


def make_pki(folder: Path) -> Pki:
    """Self-signed CA and leaf certificates for localhost/127.0.0.1, written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(path)

    def write_cert(cert: x509.Certificate, path: Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cert, key, write_cert(cert, folder / f"{name}.pem")

    def leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, file: str) -> CertPair:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return CertPair(write_cert(cert, folder / f"{file}.crt"), write_key(key, folder / f"{file}.key"))

    ca, ca_key, ca_path = make_ca("test-ca")
    rogue_ca, rogue_key, rogue_path = make_ca("rogue-ca")
    return Pki(
        ca=ca_path,
        scheduler=leaf(ca, ca_key, "scheduler", "scheduler"),
        worker=leaf(ca, ca_key, "worker", "worker"),
        intruder=leaf(ca, ca_key, "intruder", "intruder"),
        rogue_ca=rogue_path,
        rogue=leaf(rogue_ca, rogue_key, "scheduler", "rogue"),
    )


def tls_credentials(ca: str, pair: CertPair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(pair.key).read_bytes() if pair else None,
        certificate_chain=Path(pair.cert).read_bytes() if pair else None,
    )
