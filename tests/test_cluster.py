"""The cluster's credentials (mailfc.cluster): created once, issued, and what TLS makes of them.

Real TLS handshakes over loopback sockets: a host's credentials pass, a
client without a certificate or with one of another CA does not.
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from mailfc import cluster
from mailfc.config import Config, parse_config
from mailfc.errors import ConfigError


def host_config(state: Path, name: str = "host-a", address: str = "127.0.0.1",
                **sections: dict[str, object]) -> Config:
    return parse_config({"paths": {"state_dir": str(state)}, "host": {"name": name},
                         "dispatcher": {"address": address}, **sections}, "test")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str) -> str:
    """Whether a client reaches the server's first byte: "ok" or the TLS error."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError) as error:
            errors.append(str(error))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(socket.create_connection(listener.getsockname(), timeout=5),
                                server_hostname=server_hostname) as tls:
            data = tls.recv(5)
    except (ssl.SSLError, OSError) as error:
        data = b""
        errors.append(str(error))
    finally:
        thread.join(10)
        listener.close()
    return "ok" if data == b"hello" else "; ".join(errors) or "closed"


def test_first_need_creates_the_ca_and_this_hosts_certificate(tmp_path: Path) -> None:
    config = host_config(tmp_path)
    own = cluster.host_credentials(config)
    directory = tmp_path / "cluster"
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600 and mode(own.key) == 0o600
    first = own.cert.read_bytes()
    # Created once: a second need finds them.
    assert cluster.host_credentials(config) == own and own.cert.read_bytes() == first
    # Another dispatcher address: the certificate is issued again, by the same CA.
    moved = cluster.host_credentials(host_config(tmp_path, address="10.9.0.1"))
    assert moved.cert.read_bytes() != first
    assert moved.ca.read_bytes() == own.ca.read_bytes()


def test_a_host_added_on_the_first_one_talks_to_it(tmp_path: Path) -> None:
    first = host_config(tmp_path / "a")
    issued = cluster.issue_for_host(first, "host-b", "10.84.0.2", tmp_path / "for-b")
    assert mode(tmp_path / "for-b") == 0o700 and mode(issued.key) == 0o600
    second = host_config(tmp_path / "b", "host-b", "10.84.0.2", cluster={
        "ca_file": str(issued.ca), "cert_file": str(issued.cert),
        "key_file": str(issued.key)})
    # A's router to B's dispatcher, and B's router to A's dispatcher.
    assert handshake(cluster.server_context(second), cluster.client_context(first),
                     "10.84.0.2") == "ok"
    assert handshake(cluster.server_context(first), cluster.client_context(second),
                     "127.0.0.1") == "ok"
    # The dispatcher's certificate must name the address connected to.
    assert "match" in handshake(cluster.server_context(second),
                                cluster.client_context(first), "10.84.0.3")
    # Host B holds no CA key: it cannot issue credentials.
    with pytest.raises(ConfigError, match="CA key"):
        cluster.issue_for_host(second, "host-c", "10.84.0.6", tmp_path / "for-c")


def test_no_certificate_of_the_cluster_no_handshake(tmp_path: Path) -> None:
    config = host_config(tmp_path / "a")
    server = cluster.server_context(config)
    own = cluster.host_credentials(config)
    anonymous = ssl.create_default_context(cafile=str(own.ca))
    assert handshake(server, anonymous, "127.0.0.1") != "ok"

    cluster.new_ca(tmp_path / "other-ca.pem", tmp_path / "other-ca.key")
    cluster.issue(tmp_path / "other-ca.pem", tmp_path / "other-ca.key", "intruder",
                  "127.0.0.1", tmp_path / "intruder.pem", tmp_path / "intruder.key")
    foreign = ssl.create_default_context(cafile=str(own.ca))
    foreign.load_cert_chain(tmp_path / "intruder.pem", tmp_path / "intruder.key")
    assert handshake(server, foreign, "127.0.0.1") != "ok"


def test_configuration_mistakes_name_the_fix(tmp_path: Path) -> None:
    partial = host_config(tmp_path, cluster={"ca_file": str(tmp_path / "ca.pem")})
    with pytest.raises(ConfigError, match="must be given together"):
        cluster.host_credentials(partial)
    missing = host_config(tmp_path, cluster={
        "ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "c.pem"),
        "key_file": str(tmp_path / "k.pem")})
    with pytest.raises(ConfigError, match="mailfc host add host-a"):
        cluster.host_credentials(missing)
