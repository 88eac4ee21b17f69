#!/bin/sh
# mailfc set-up for a Debian 12 machine, run as root.  Idempotent.
#
#   ./setup.sh          install the Debian packages and the Python package
#
# Installs: PostgreSQL (the embedded CMDB), Postfix and Dovecot (the per-domain
# servers, run from these binaries inside containers), runc and iproute2 (the
# container runtime), swaks, miltertest and OpenDKIM (test clients and a
# third-party milter), then mailfc itself into a virtual environment at
# ./.venv with the extras the tests and benchmarks need (test, bench, plot),
# with `mailfc` linked into /usr/local/bin.
set -eu
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

# libnet-ssleay-perl: swaks's TLS (a Recommends, which --no-install-recommends skips).
PACKAGES="postgresql postfix postfix-pcre dovecot-imapd dovecot-lmtpd dovecot-dev runc
  iproute2 swaks libnet-ssleay-perl miltertest opendkim opendkim-tools python3 python3-venv
  python3-dev build-essential openssl ca-certificates"

missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix asks how to configure the host's own instance: mailfc never uses it.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The host's own daemons would hold ports 25, 143 and 993 that mailfc's
# resident listeners need; mailfc runs its own instances from the same binaries.
for service in postfix dovecot; do
    if [ -d /run/systemd/system ]; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        service "$service" stop >/dev/null 2>&1 || true
    fi
done

# mailfc's Dovecot IMAP hook plugin, built against the installed dovecot-dev and
# installed where every per-domain Dovecot loads it.  make refuses (and installs
# nothing) when the headers' Dovecot ABI is not the installed Dovecot's.
if ! make -s -C plugins/dovecot_hooks install; then
    echo "setup.sh: the Dovecot hook plugin could not be built or installed (see above)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# test: the suite; bench: the benchmarks' sinks and milter (tests/test_benches.py
# runs them); plot: matplotlib for `abuse --plot` (its tests draw).
.venv/bin/python -m pip install -q -e '.[test,bench,plot]'
ln -sf "$(pwd)/.venv/bin/mailfc" /usr/local/bin/mailfc
echo "setup.sh: done ($(.venv/bin/mailfc --version))"
