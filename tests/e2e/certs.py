"""Certificates and CRLs that moatctl will not make: an intermediate CA and its leaves, a
certificate without a department, CRLs whose next update has passed. Made with
`cryptography`, the way another CA (or an attacker holding a key) would make them."""

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Authority:
    """A CA certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def load_authority(cert_path: Path, key_path: Path) -> Authority:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return Authority(cert, key)


def name(*pairs: tuple[str, str], **attributes: str) -> x509.Name:
    """An X.509 name of O, OU and CN attributes, in the order given: as (kind, value) pairs
    (a kind may repeat) and then as keywords."""
    oids = {"O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
            "CN": NameOID.COMMON_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v)
                      for k, v in [*pairs, *attributes.items()]])


def _key_ids(builder, public_key, issuer: Authority | None):
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    return builder


def make_ca(subject: x509.Name, issuer: Authority | None = None, days: int = 30) -> Authority:
    """A CA that may issue end-entity certificates only: self-signed without `issuer`, an
    intermediate of `issuer` with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True)
    )
    builder = _key_ids(builder, key.public_key(), issuer)
    signer = issuer.key if issuer else key
    return Authority(builder.sign(signer, hashes.SHA256()), key)


def issue_client(issuer: Authority, subject: x509.Name, days: int = 1):
    """An end-entity client certificate and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    builder = _key_ids(builder, key.public_key(), issuer)
    return builder.sign(issuer.key, hashes.SHA256()), key


def make_crl(issuer: Authority, last_update: datetime.datetime,
             next_update: datetime.datetime, number: int = 1) -> x509.CertificateRevocationList:
    """An empty CRL of `issuer` with the given validity."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    )
    return builder.sign(issuer.key, hashes.SHA256())


def write_pem(path: Path, *objects) -> Path:
    """Writes certificates, CRLs and private keys (PKCS#8, mode 0600) as one PEM file."""
    chunks = []
    private = False
    for obj in objects:
        if isinstance(obj, ec.EllipticCurvePrivateKey):
            private = True
            chunks.append(obj.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        else:
            chunks.append(obj.public_bytes(serialization.Encoding.PEM))
    path.write_bytes(b"".join(chunks))
    if private:
        path.chmod(0o600)
    return path
