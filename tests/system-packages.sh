#!/usr/bin/env bash
# The system packages the test suite runs for real (the README's test command runs
# this first): Prometheus scrapes a daemon over TCP; HAProxy balances a fleet; the
# TUI runs in a real terminal under tmux; the service boots under a real systemd in
# systemd-nspawn, on a Debian made by debootstrap (tests/booted.py).
# Installed with apt as root when missing; otherwise says what is missing.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v haproxy >/dev/null || need+=(haproxy)
command -v tmux >/dev/null || need+=(tmux)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "the tests need: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# no services started at install: the tests start their own, on their own ports
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.edgellm-tests
chmod +x /usr/sbin/policy-rc.d.edgellm-tests
placed=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    mv /usr/sbin/policy-rc.d.edgellm-tests /usr/sbin/policy-rc.d
    placed=1
else
    rm -f /usr/sbin/policy-rc.d.edgellm-tests
fi
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
[ "$placed" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
exit 0
