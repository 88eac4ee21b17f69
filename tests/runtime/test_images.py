"""Images and bundles without running anything: rendered configs and the OCI spec."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from mailfc.config import parse_config
from mailfc.errors import ConfigError
from mailfc.runtime import RuntimeSettings
from mailfc.runtime.bundle import (
    CAPABILITIES,
    Limits,
    build_spec,
    ensure_rootfs,
    nofile_limit,
    seccomp_architectures,
    seccomp_profile,
)
from mailfc.runtime.images import (
    DOVECOT,
    MAIL_MOUNT,
    POSTFIX,
    SOCKET_MOUNT,
    hook_plugin_installed,
    image_for,
    render_etc,
    template_context,
)
from mailfc.runtime.network import names_for

SETTINGS = RuntimeSettings(state_dir=Path("/srv/state"), subnet="10.66.0.0/16")


def _render(image: str, tmp_path: Path, settings: RuntimeSettings = SETTINGS) -> Path:
    chosen = {"postfix": POSTFIX, "dovecot": DOVECOT}[image]
    render_etc(chosen, tmp_path, template_context(chosen, "example.org", settings))
    return tmp_path


def test_services_map_to_two_images() -> None:
    assert image_for("smtp") is POSTFIX
    assert image_for("lmtp") is image_for("imap") is DOVECOT
    assert DOVECOT.record_service == "imap"
    with pytest.raises(ValueError, match="unknown service"):
        image_for("pop3")


def test_postfix_config(tmp_path: Path) -> None:
    etc = _render("postfix", tmp_path)
    main_cf = (etc / "postfix/main.cf").read_text()
    assert "myhostname = mail.example.org" in main_cf
    assert "virtual_mailbox_domains = example.org" in main_cf
    assert f"default_transport = lmtp:unix:{SOCKET_MOUNT}/filter-out.sock" in main_cf
    # The dispatcher's unix socket is the only smtpd; Postfix calls its client 127.0.0.1.
    assert "smtpd_authorized_xclient_hosts = 127.0.0.1/32" in main_cf
    assert "inet_interfaces = loopback-only" in main_cf and "\nmynetworks =\n" in main_cf
    assert f"smtpd_milters = unix:{SOCKET_MOUNT}/milter.sock" in main_cf
    assert "milter_default_action = accept" in main_cf
    master_cf = (etc / "postfix/master.cf").read_text()
    services = [line.split() for line in master_cf.splitlines()
                if line and not line.startswith(("#", " "))]
    assert all(fields[4] == "n" for fields in services), "chroot = n for every service"
    assert [fields[0] for fields in services if fields[-1] == "smtpd"] == ["dispatcher"]
    assert all(fields[1] != "inet" for fields in services), "no network listener"
    assert "haproxy" not in master_cf
    # Postfix re-reads a main.cf younger than a few seconds before it starts.
    assert (etc / "postfix/main.cf").stat().st_mtime < 1e9


def test_dovecot_config(tmp_path: Path) -> None:
    etc = _render("dovecot", tmp_path)
    conf = (etc / "dovecot/dovecot.conf").read_text()
    assert "protocols = imap lmtp" in conf
    assert "deny = yes" in conf and "allow_real_nets" not in conf
    assert "trusted_networks" not in conf and "haproxy" not in conf
    assert "\nlisten = 127.0.0.1\n" in conf
    listeners = conf[conf.index("service imap-login"):]
    assert "port = 0" in listeners and "port = 1" not in listeners and "port = 2" not in listeners
    assert "unix_listener lmtp {\n    mode = 0600" in conf
    assert f"home={MAIL_MOUNT}/%Ln" in conf
    assert "mail_fsync = always" in conf and "lock_method = dotlock" in conf
    assert ("mailfc_hooks" in conf) == hook_plugin_installed("mailfc_hooks"), \
        "the hook plugin is loaded exactly when installed"
    relaxed = _render("dovecot", tmp_path / "relaxed", SETTINGS.replace(nfs_safe=False))
    assert "mail_fsync" not in (relaxed / "dovecot/dovecot.conf").read_text()


def test_etc_skeleton_is_not_the_hosts(tmp_path: Path) -> None:
    etc = _render("dovecot", tmp_path)
    assert sorted(p.name for p in etc.iterdir() if p.is_file()) == [
        "group", "hosts", "nsswitch.conf", "passwd", "protocols", "resolv.conf", "services"]
    assert not (etc / "shadow").exists()
    passwd = (etc / "passwd").read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {
        "root", "postfix", "dovecot", "dovenull", "vmail", "nobody"}


def test_oci_spec(tmp_path: Path) -> None:
    ensure_rootfs(tmp_path / "rootfs")
    assert (tmp_path / "rootfs/lib").readlink() == Path("usr/lib")
    spec = build_spec(
        name="mailfc-0123abcd", image=POSTFIX, rootfs=tmp_path / "rootfs",
        etc_dir=tmp_path / "etc", mail_dir=tmp_path / "mail", socket_dir=tmp_path / "sockets",
        state_dirs={"/var/spool/postfix": tmp_path / "spool"},
        netns_path="/run/netns/mailfc-0123abcd", cgroups_path="/mailfc/mailfc-0123abcd",
        limits=Limits(50000, 100000, 256 << 20, 256), hostname="mail.example.org",
        annotations={"mailfc.domain": "example.org"})
    assert spec["root"] == {"path": str(tmp_path / "rootfs"), "readonly": True}
    assert spec["process"]["args"] == ["/usr/lib/postfix/sbin/master", "-i"]
    assert spec["process"]["noNewPrivileges"] is True
    assert sorted(spec["process"]["capabilities"]["bounding"]) == sorted(CAPABILITIES)
    assert spec["process"]["rlimits"][0]["hard"] == nofile_limit()
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert "ro" in mounts["/usr"]["options"] and "ro" in mounts["/etc"]["options"]
    assert "rw" in mounts[MAIL_MOUNT]["options"] and "ro" in mounts[SOCKET_MOUNT]["options"]
    assert mounts["/tmp"]["type"] == mounts["/run"]["type"] == "tmpfs"
    assert "/sys" not in mounts
    linux = spec["linux"]
    assert linux["cgroupsPath"] == "/mailfc/mailfc-0123abcd"
    assert linux["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 256}
    assert {"type": "network", "path": "/run/netns/mailfc-0123abcd"} in linux["namespaces"]
    seccomp = linux["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert seccomp["architectures"] == seccomp_architectures()
    denied = {name for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO"
              and rule.get("errnoRet") == errno.EPERM and not rule.get("args")
              for name in rule["names"]}
    assert {"mount", "unshare", "setns", "keyctl", "bpf", "ptrace", "kexec_load",
            "open_by_handle_at", "init_module", "userfaultfd"} <= denied


def test_seccomp_refuses_unusual_personas_only() -> None:
    rules = [rule for rule in seccomp_profile("x86_64")["syscalls"]
             if rule["names"] == ["personality"]]

    def refused(persona: int) -> bool:
        return any(persona & arg["value"] == arg["valueTwo"]
                   for rule in rules for arg in rule["args"])

    for usual in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert not refused(usual), hex(usual)
    for unusual in (0x0040000, 0x0400000, 0x0100000, 0x80000000, 0xFFFFFFFE, 0x20048):
        assert refused(unusual), hex(unusual)


def test_names_fit_interface_limits() -> None:
    name, veth = names_for("mailfc", "0123abcd")
    assert name == "mailfc-0123abcd" and veth == "vmailfc0123abcd" and len(veth) <= 15
    assert len(names_for("averylongpre", "0123abcd")[1]) <= 15


def test_settings_defaults_derive_everything() -> None:
    settings = RuntimeSettings()
    assert str(settings.bridge_address) == "10.77.0.1"
    assert settings.sockets == Path("/var/lib/mailfc/private/sockets")
    assert settings.filter_out_socket == "filter-out.sock"
    assert settings.mail_dir == Path("/var/lib/mailfc/mail")
    assert settings.cgroup_parent == "/mailfc"
    with pytest.raises(ValueError, match="IPv4 subnet"):
        RuntimeSettings(subnet="10.0.0.0/30")
    with pytest.raises(ValueError, match="name_prefix"):
        RuntimeSettings(name_prefix="bad-prefix")


def test_oci_spec_user_namespace(tmp_path: Path) -> None:
    """Root inside is an unprivileged id range on the host; no base, no user namespace."""
    def spec_with(id_base: int) -> dict[str, Any]:
        return build_spec(
            name="mailfc-0123abcd", image=DOVECOT, rootfs=tmp_path / "rootfs",
            etc_dir=tmp_path / "etc", mail_dir=tmp_path / "mail",
            socket_dir=tmp_path / "sockets", state_dirs={}, netns_path="/run/netns/x",
            cgroups_path="/mailfc/x", limits=Limits(50000, 100000, 256 << 20, 256),
            hostname="mail.example.org", annotations={}, id_base=id_base)

    linux = spec_with(0x70000000)["linux"]
    assert {"type": "user"} in linux["namespaces"]
    mapping = [{"containerID": 0, "hostID": 0x70000000, "size": 65536}]
    assert linux["uidMappings"] == linux["gidMappings"] == mapping
    plain = spec_with(0)["linux"]
    assert {"type": "user"} not in plain["namespaces"] and "uidMappings" not in plain
    assert RuntimeSettings().outside_id(5000) == 0x70000000 + 5000
    with pytest.raises(ConfigError, match="multiple of 65536"):
        parse_config({"runtime": {"container_id_base": 100001}})
