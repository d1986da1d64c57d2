#!/usr/bin/env bash
# Install everything lazysnap's daemon, tests and demo need on a fresh Debian 12, as root.
# Idempotent and quiet on success: apt runs only when a package is missing, pip only when
# requirements.lock (every Python package, pinned with hashes) changed since the last install. Loud on failure (the failing step's log).
#
#   LAZYSNAP_VENV=/path   venv to create/use (default /opt/lazysnap-venv)
#   PYTHON=python3.11     interpreter for a new venv (default python3)
#
# No systemd here, and apt must not start services: a policy-rc.d that denies starts is put in
# place for the duration if the machine has none. (A containerd started by the package would be
# the system instance; the tests run their own, separately.)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${LAZYSNAP_VENV:-/opt/lazysnap-venv}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(
    containerd runc docker-registry fuse3 libfuse2 libfuse3-dev pkg-config skopeo umoci
    busybox-static debootstrap golang-go golang-github-containerd-containerd-dev pigz jq curl
    iproute2 apache2-utils hyperfine python3 python3-venv python3-dev ca-certificates openssl
    golang-docker-credential-helpers pass gnupg  # docker-credential-pass for tests/remote
    systemd  # systemd-analyze verify of the units (tests/install); PID 1 stays what it is
    postgresql  # tests/accel: the job store accel replicas share (harness/postgres.py)
)
LOG=$(mktemp /tmp/lazysnap-install-deps.XXXXXX.log)
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=0

fail() {
    KEEP_LOG=1
    echo "install-deps: FAILED: $1 (full log: $LOG)" >&2
    echo "---- last lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    exit 1
}
cleanup() {
    [[ $OUR_POLICY == 1 ]] && rm -f "$POLICY"
    [[ -f $LOG && ${KEEP_LOG:-0} == 0 ]] && rm -f "$LOG"
    return 0
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "install-deps: must run as root" >&2; exit 1; }

# Retry while another apt/dpkg holds the lock (unattended upgrades, another engineer's install).
apt_retry() {
    local attempt
    for attempt in $(seq 1 30); do
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 -q "$@" >>"$LOG" 2>&1; then
            return 0
        fi
        if grep -qE 'Could not get lock|Unable to lock|is another process using it' "$LOG"; then
            echo "install-deps: apt lock held, retry $attempt/30" >>"$LOG"
            sleep 10
            continue
        fi
        return 1
    done
    return 1
}

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "install-deps: apt-get install ${missing[*]}"
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod 755 "$POLICY" && OUR_POLICY=1
    fi
    apt_retry update || fail "apt-get update"
    apt_retry install -y --no-install-recommends "${missing[@]}" || fail "apt-get install ${missing[*]}"
fi

# FUSE needs the device node (containers sometimes lack it).
[[ -e /dev/fuse ]] || mknod -m 666 /dev/fuse c 10 229 || fail "no /dev/fuse and mknod failed"

if [[ ! -x $VENV/bin/python ]]; then
    echo "install-deps: creating venv $VENV"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "$PYTHON -m venv $VENV"
fi
STAMP=$VENV/.lazysnap-deps
WANT=$(cat "$REPO/requirements.lock" "$0" | sha256sum | cut -c1-16)
if [[ $(cat "$STAMP" 2>/dev/null) != "$WANT:$REPO" ]] || ! "$VENV/bin/python" -c 'import snapshotter' 2>/dev/null; then
    # Exactly the lock: every package pinned and hash-checked (requirements.lock, written by
    # scripts/lock.sh), lazysnap itself editable without build isolation (its build requirements
    # are in the lock too), and whatever else an older install left in the venv removed.
    echo "install-deps: pip install -r requirements.lock (hash-checked) into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
        -r "$REPO/requirements.lock" >>"$LOG" 2>&1 || fail "pip install -r requirements.lock"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --no-build-isolation -e "$REPO" >>"$LOG" 2>&1 || fail "pip install -e $REPO"
    extra=$("$VENV/bin/python" "$REPO/scripts/lock/extras.py" "$REPO/requirements.lock") \
        || fail "comparing $VENV with requirements.lock"
    if [[ -n $extra ]]; then
        echo "install-deps: removing packages the lock does not name: $extra"
        # shellcheck disable=SC2086  # a list of names
        "$VENV/bin/python" -m pip uninstall -q -y $extra >>"$LOG" 2>&1 || fail "pip uninstall $extra"
    fi
    echo "$WANT:$REPO" >"$STAMP"
fi
