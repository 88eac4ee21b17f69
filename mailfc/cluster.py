"""Cluster credentials: the CA every host trusts, each host's certificate, the TLS contexts.

Routers reach the dispatcher of another host over TCP with mutual TLS
(mailfc.dispatcher.server, SECURITY): each side presents a certificate signed
by the cluster CA and checks the other's against that CA; the router also
checks that the dispatcher's certificate names the address it connected to.
An address proves nothing; a key only the cluster's hosts hold does.

FILES (defaults, under <state_dir>/cluster/, mode 0700)
    ca.pem          the cluster CA certificate (every host has it)
    ca.key          the CA's private key (0600): only on the host that issues
                    credentials, the first one
    host.pem        this host's certificate: CN = host.name, SAN = IP
                    dispatcher.address and DNS host.name, usable as server and client
    host.key        its private key (0600)
    hosts/NAME/     what `mailfc host add NAME` issued for another host:
                    ca.pem, cert.pem, key.pem (the directory 0700, the key 0600)

FIRST NEED
    With cluster.ca_file, cert_file and key_file empty, the first process that
    needs a TLS context creates what is missing, under a lock (the supervisor
    starts several processes at once): the CA when neither ca.pem nor ca.key
    exists, then this host's certificate (again when host.name or
    dispatcher.address changed), signed with ca.key.  A host whose
    configuration names the files (a host added with `mailfc host add`) uses
    them as they are and creates nothing.  Keys are ECDSA P-256; the CA is valid
    for CA_DAYS, a host's certificate for HOST_DAYS (issue again with `mailfc
    host add`, or delete host.pem on the first host, to renew).

CONTEXTS
    server_context(config)  the dispatcher's TCP listeners: this host's
                            certificate; a client certificate signed by the
                            cluster CA is required (CERT_REQUIRED).
    client_context(config)  the routers towards another host's dispatcher:
                            this host's certificate, the peer verified against
                            the cluster CA only (never the system's CAs).
    Each is built once per process; both need TLS 1.3.

CONFIGURATION
    cluster.ca_file, cert_file, key_file (all three or none; "" = the files
    above), cluster.ca_key_file ("" = <state_dir>/cluster/ca.key).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailfc.config import Config
from mailfc.errors import ConfigError

CA_DAYS = 20 * 365
HOST_DAYS = 10 * 365
CA_NAME = "mailfc cluster CA"


@dataclass(frozen=True)
class Credentials:
    """Where one host's TLS files are."""

    ca: Path
    cert: Path
    key: Path


def cluster_dir(config: Config) -> Path:
    return config.state_dir / "cluster"


def ca_key_path(config: Config) -> Path:
    return Path(config.cluster.ca_key_file) if config.cluster.ca_key_file \
        else cluster_dir(config) / "ca.key"


def configured(config: Config) -> Credentials | None:
    """The files the configuration names, or None for the state directory's."""
    section = config.cluster
    given = [section.ca_file, section.cert_file, section.key_file]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("cluster.ca_file, cluster.cert_file and cluster.key_file must be "
                          "given together (or none of them, for the files under "
                          f"{cluster_dir(config)})")
    return Credentials(Path(section.ca_file), Path(section.cert_file), Path(section.key_file))


def host_credentials(config: Config) -> Credentials:
    """This host's credentials; with none configured, those under the state
    directory, created on first need (see FIRST NEED)."""
    named = configured(config)
    if named is not None:
        for path in (named.ca, named.cert, named.key):
            if not path.exists():
                raise ConfigError(
                    f"cluster credential {path} missing: copy the files `mailfc host add "
                    f"{config.host_name}` wrote on the first host, or fix cluster.* in the "
                    "configuration")
        return named
    directory = cluster_dir(config)
    own = Credentials(directory / "ca.pem", directory / "host.pem", directory / "host.key")
    with _locked(directory):
        ca_key = ca_key_path(config)
        if not own.ca.exists() and not ca_key.exists():
            _write_ca(own.ca, ca_key)
        if own.cert.exists() and own.key.exists() and _names_match(own.cert, config):
            return own
        if not ca_key.exists():
            raise ConfigError(
                f"no certificate for host {config.host_name} in {directory} and no cluster "
                f"CA key ({ca_key}) to issue one: run `mailfc host add {config.host_name} "
                "--dispatcher ADDRESS --subnet SUBNET` on the first host and set cluster.* "
                "to the files it writes")
        issue(own.ca, ca_key, config.host_name, config.dispatcher.address,
              own.cert, own.key)
    return own


def issue_for_host(config: Config, name: str, address: str, directory: Path) -> Credentials:
    """Credentials for another host (`mailfc host add`): the cluster CA certificate
    and a certificate + key for `name` at `address`, written into `directory`."""
    own = host_credentials(config)     # the cluster CA exists from here on
    ca_key = ca_key_path(config)
    if not ca_key.exists():
        raise ConfigError(f"the cluster CA key {ca_key} is not on this host: run `mailfc "
                          "host add` on the host that holds it (the first host)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        written = Credentials(directory / "ca.pem", directory / "cert.pem",
                              directory / "key.pem")
        _write(written.ca, own.ca.read_bytes(), 0o644)
        issue(own.ca, ca_key, name, address, written.cert, written.key)
    except OSError as error:
        raise ConfigError(f"cannot write the credentials for {name} into {directory}: "
                          f"{error.strerror or error}: choose another directory with "
                          "--credentials") from None
    return written


def issue(ca_cert: Path, ca_key: Path, name: str, address: str,
          cert_path: Path, key_path: Path) -> None:
    """A certificate for host `name` (CN and DNS SAN) at `address` (IP SAN),
    signed by the CA, usable as TLS server and client."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"invalid dispatcher address {address!r}: expected an IP "
                          "address") from None
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key}: not a cluster CA key (ECDSA expected)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.IPAddress(ip)]
    with contextlib.suppress(ValueError):   # a host name that is no DNS name stays the CN
        names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=HOST_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    # The key first: a certificate never exists without its key.
    _write(key_path, _private_bytes(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def new_ca(cert_path: Path, key_path: Path) -> None:
    """A new cluster CA (also what a test uses to make a foreign one)."""
    _write_ca(cert_path, key_path)


def _write_ca(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _private_bytes(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _names_match(cert_path: Path, config: Config) -> bool:
    """Whether this host's certificate still names its host name and dispatcher address."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    addresses = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return config.dispatcher.address in addresses and bool(common) and \
        common[0].value == config.host_name


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode` from the first byte on, replacing it whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        handle = (directory / ".lock").open("a")
    except OSError as error:
        raise ConfigError(f"cannot create the cluster credentials in {directory}: "
                          f"{error.strerror or error}: run as root or set "
                          "cluster.ca_file, cert_file and key_file") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}


def server_context(config: Config) -> ssl.SSLContext:
    """For the dispatcher's TCP listeners: only a client with a certificate of
    this cluster completes the handshake."""
    return _context("server", config)


def client_context(config: Config) -> ssl.SSLContext:
    """For a router connecting to another host's dispatcher (server_hostname: the
    dispatcher address it connects to)."""
    return _context("client", config)


def _context(role: str, config: Config) -> ssl.SSLContext:
    # Keyed by what decides the files, so a connection costs a dict lookup, not
    # a look at the files.
    key = (role, str(config.state_dir), config.host_name, config.dispatcher.address,
           config.cluster.ca_file, config.cluster.cert_file, config.cluster.key_file)
    context = _contexts.get(key)
    if context is not None:
        return context
    credentials = host_credentials(config)
    purpose = ssl.Purpose.CLIENT_AUTH if role == "server" else ssl.Purpose.SERVER_AUTH
    try:
        # With a cafile, the system's CAs are not loaded: only the cluster's counts.
        context = ssl.create_default_context(purpose, cafile=str(credentials.ca))
        context.load_cert_chain(credentials.cert, credentials.key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load the cluster credentials {credentials.cert} / "
                          f"{credentials.key} / CA {credentials.ca}: {error}: issue them "
                          "again with `mailfc host add`") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    _contexts[key] = context
    return context
