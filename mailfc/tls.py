"""TLS for the resident listeners: the configured certificate, or a self-signed one.

With `tls.cert_file` and `tls.key_file` empty, a self-signed certificate for
this host's name is generated once into <state_dir>/tls (with the openssl
command, Debian package openssl) so the platform runs out of the box; clients
then have to be told to accept it.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from mailfc.config import Config
from mailfc.errors import ConfigError


def certificate_paths(config: Config) -> tuple[Path, Path]:
    if config.tls.cert_file or config.tls.key_file:
        if not (config.tls.cert_file and config.tls.key_file):
            raise ConfigError("tls.cert_file and tls.key_file must be given together")
        return Path(config.tls.cert_file), Path(config.tls.key_file)
    directory = config.state_dir / "tls"
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (cert.exists() and key.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        try:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                 "-subj", f"/CN={config.host_name}", "-addext",
                 f"subjectAltName=DNS:{config.host_name},DNS:localhost,IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise ConfigError("openssl not found: apt-get install openssl") from None
        except subprocess.CalledProcessError as error:
            raise ConfigError(f"could not create a self-signed certificate: "
                              f"{error.stderr.strip()}") from None
    return cert, key


def server_context(config: Config) -> ssl.SSLContext:
    cert, key = certificate_paths(config)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {error}") from None
    return context
