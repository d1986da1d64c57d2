#!/usr/bin/env bash
# Install lazysnap on a container node (Debian 12 or alike), as root, from this checkout:
#
#   /opt/lazysnap/                         a venv: lazysnap and its runtime packages only (and
#                                          with --postgres, the postgres extra: psycopg)
#   /usr/local/bin/lazysnap                -> /opt/lazysnap/bin/lazysnap
#   /etc/lazysnap/config.toml              docs/example-config.toml (an existing file is kept)
#   /usr/local/lib/systemd/system/         lazysnap.service, lazysnap-accel.service
#   /usr/local/share/doc/lazysnap/         README.md and docs/ (the units' Documentation=)
#
# then prints the containerd config that makes containerd use it. Running it again upgrades in
# place (the config is left alone; a running lazysnap.service is restarted, which keeps lazy
# mounts serving running containers). Nothing is enabled or started on a first install.
#
#   scripts/install-node.sh [--apt] [--postgres] [--python PYTHON] [--prefix DIR]
#   scripts/install-node.sh --uninstall [--purge] [--prefix DIR]
#
#   --apt          apt-get install the missing system packages (python3, python3-venv, fuse3,
#                  libfuse3-3) instead of naming them and stopping
#   --postgres     also install the `postgres` extra (psycopg, pinned in requirements.lock): the
#                  PostgreSQL job store several lazysnap-accel replicas share
#                  (docs/acceleration-service.md); a re-run keeps it once the venv has it
#   --python PY    interpreter for the venv (default python3; lazysnap needs 3.11 or newer)
#   --prefix DIR   put every path above under DIR (a scratch root for tests; the units and the
#                  config then name the prefixed paths); no systemctl calls
#   --uninstall    remove what the install put there, except /etc/lazysnap (config, credentials)
#                  and the state directory /var/lib/lazysnap
#   --purge        with --uninstall: remove /etc/lazysnap/config.toml, /var/lib/lazysnap and
#                  /run/lazysnap too (refused while anything is mounted under the state dir)
#
# Python packages come from requirements.lock, hash-checked, through pip's configured index
# (PyPI). Only the runtime part of the lock is installed: pip cannot install part of a hashed
# lock, so scripts/lock/subset.py cuts it (pyproject.toml's [project] dependencies, with
# --postgres its `postgres` extra's too, and what they need), and lazysnap itself is installed
# as a wheel built here, in a throw-away venv holding the lock's build packages (setuptools,
# wheel): the node venv gets no test tools, nothing unpinned, and no link back to this checkout
# (it can be deleted afterwards).
set -euo pipefail
# Files readable by all whatever the caller's umask: lazysnap-accel.service runs as a dynamic
# user that must read the venv.
umask 022

REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=""
PYTHON=python3
USE_APT=0
POSTGRES=0
UNINSTALL=0
PURGE=0
APT_PACKAGES=(python3 python3-venv fuse3 libfuse3-3)
UNITS=(lazysnap.service lazysnap-accel.service)

usage() {  # the comment block above
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}
die() {
    echo "install-node: $*" >&2
    exit 1
}
say() { echo "install-node: $*"; }

while (($#)); do
    case $1 in
        --apt) USE_APT=1 ;;
        --postgres) POSTGRES=1 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h | --help) usage ;;
        *) echo "install-node: unknown argument $1" >&2; usage ;;
    esac
    shift
done
((PURGE == 0 || UNINSTALL == 1)) || die "--purge goes with --uninstall"
((POSTGRES == 0 || UNINSTALL == 0)) || die "--postgres goes with an install, not --uninstall"
if [[ -n $PREFIX ]]; then
    # The prefix is pasted into unit files and TOML strings: keep it to plain path characters.
    [[ $PREFIX =~ ^/[A-Za-z0-9/._-]*$ ]] || die "--prefix must be an absolute path of letters, digits and /._- (got '$PREFIX')"
    PREFIX=${PREFIX%/}
fi
[[ -n $PREFIX || $(id -u) == 0 ]] || die "run as root (or with --prefix DIR for a scratch install)"

VENV=$PREFIX/opt/lazysnap
BIN_LINK=$PREFIX/usr/local/bin/lazysnap
ETC=$PREFIX/etc/lazysnap
CONFIG=$ETC/config.toml
UNIT_DIR=$PREFIX/usr/local/lib/systemd/system
DOC_DIR=$PREFIX/usr/local/share/doc/lazysnap
STATE=$PREFIX/var/lib/lazysnap
RUN_DIR=$PREFIX/run/lazysnap
SOCKET=$RUN_DIR/lazysnap.sock

# The operator's environment must not leak into the venv's interpreter (a PYTHONPATH pointing at
# a checkout would make the installed lazysnap import that code instead).
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP

# systemctl only for the real root, and only where systemd runs.
systemd_running() { [[ -z $PREFIX && -d /run/systemd/system ]]; }

# --- uninstall ----------------------------------------------------------------------------------

mounts_under() {  # mount points below $1, from the kernel's table
    awk -v dir="$1/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo
}

uninstall() {
    if ((PURGE)); then  # refuse before removing anything
        local mounted
        mounted=$(mounts_under "$STATE")
        [[ -z $mounted ]] || die "not purging $STATE: still mounted there (stop the containers
using lazysnap images, then umount):
$mounted"
    fi
    if systemd_running; then
        systemctl disable --now "${UNITS[@]}" 2>/dev/null || true
    fi
    local unit
    for unit in "${UNITS[@]}"; do
        rm -f "$UNIT_DIR/$unit"
    done
    systemd_running && systemctl daemon-reload
    if [[ -L $BIN_LINK ]]; then
        rm -f "$BIN_LINK"
    elif [[ -e $BIN_LINK ]]; then
        say "left $BIN_LINK alone: not the symlink this script makes"
    fi
    rm -rf "$VENV" "$DOC_DIR"
    if ((PURGE)); then
        rm -rf "$STATE" "$RUN_DIR"
        rm -f "$CONFIG"
        if [[ -d $ETC ]] && ! rmdir "$ETC" 2>/dev/null; then
            say "left $ETC: it holds files this script did not write"
        fi
        say "removed lazysnap, its config $CONFIG and its state $STATE"
    else
        say "removed lazysnap; kept $CONFIG and $STATE (--uninstall --purge removes them)"
    fi
}

if ((UNINSTALL)); then
    uninstall
    exit 0
fi

# --- what the node must have --------------------------------------------------------------------

missing=()
if ! command -v "$PYTHON" >/dev/null; then
    [[ $PYTHON == python3 ]] || die "--python $PYTHON: no such interpreter"
    missing+=(python3)
fi
if command -v "$PYTHON" >/dev/null; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1): lazysnap needs Python 3.11 or newer (--python)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
fi
command -v fusermount3 >/dev/null || missing+=(fuse3)
# mfusepy loads libfuse3 with ctypes: the library, not the -dev package.
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)  # not on a non-root PATH
"$ldconfig" -p 2>/dev/null | grep -q 'libfuse3\.so\.3 ' || missing+=(libfuse3-3)
if ((${#missing[@]})); then
    ((USE_APT)) || die "missing system packages: ${missing[*]}
  install them:  apt-get install --no-install-recommends ${missing[*]}
  (or run this script with --apt)"
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q update
    DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}"
fi
[[ -e /dev/fuse ]] || say "warning: no /dev/fuse here (modprobe fuse): layers will not mount lazily"

# --- the venv -----------------------------------------------------------------------------------

WORK=$(mktemp -d /tmp/lazysnap-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
pip_quiet() {  # pip_quiet PYTHON ARGS...: pip, its output shown only if it fails
    local python=$1
    shift
    if ! "$python" -m pip --disable-pip-version-check --quiet "$@" >"$WORK/pip.log" 2>&1; then
        cat "$WORK/pip.log" >&2
        die "pip $* failed"
    fi
}

# An upgrade keeps the extra an earlier --postgres put in: dropping psycopg would stop the
# accel replicas that use a PostgreSQL store at their next start.
if ((POSTGRES == 0)) && [[ -x $VENV/bin/python ]] \
    && "$VENV/bin/python" -c 'import psycopg' 2>/dev/null; then
    say "keeping the postgres extra $VENV has"
    POSTGRES=1
fi
EXTRAS=()
((POSTGRES == 0)) || EXTRAS+=(postgres)
"$PYTHON" "$REPO/scripts/lock/subset.py" runtime "$REPO/requirements.lock" \
    "$REPO/pyproject.toml" "${EXTRAS[@]}" >"$WORK/runtime.lock"
"$PYTHON" "$REPO/scripts/lock/subset.py" build "$REPO/requirements.lock" \
    "$REPO/scripts/lock/build.in" >"$WORK/build.lock"

# A venv whose interpreter no longer runs (its Python removed or upgraded) is rebuilt.
if [[ -d $VENV ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "replacing $VENV: its interpreter no longer runs"
    rm -rf "$VENV"
fi
[[ -d $VENV ]] || "$PYTHON" -m venv "$VENV"

# Build the wheel from a copy (building in the checkout would leave build/ and egg-info there),
# in a venv without pip of its own: the node venv's pip installs into it (--python), which saves
# the seconds ensurepip takes.
say "building lazysnap's wheel"
mkdir "$WORK/src"
tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md snapshotter \
    | tar -C "$WORK/src" -xf -
"$PYTHON" -m venv --without-pip "$WORK/build-venv"
build_pip() { pip_quiet "$VENV/bin/python" --python "$WORK/build-venv/bin/python" "$@"; }
build_pip install --require-hashes -r "$WORK/build.lock"
build_pip wheel --no-deps --no-build-isolation -w "$WORK/wheel" "$WORK/src"
wheel=("$WORK"/wheel/lazysnap-*.whl)
[[ -f ${wheel[0]} ]] || die "pip wheel made no lazysnap wheel"

say "installing into $VENV (requirements.lock, runtime packages${EXTRAS[*]:+ with ${EXTRAS[*]}}, hash-checked)"
pip_quiet "$VENV/bin/python" install --require-hashes -r "$WORK/runtime.lock"
# --force-reinstall: the version stays 0.1.0 while the code changes; a re-run must take it.
pip_quiet "$VENV/bin/python" install --no-deps --no-index --force-reinstall "${wheel[0]}"
# Whatever an older install or the venv's bootstrap left that the runtime lock does not name
# (a stray package changes behaviour: httpcore imports trio when present).
extra=$("$VENV/bin/python" "$REPO/scripts/lock/extras.py" "$WORK/runtime.lock")
if [[ -n $extra ]]; then
    # shellcheck disable=SC2086  # a list of names
    pip_quiet "$VENV/bin/python" uninstall -y $extra
fi
pip_quiet "$VENV/bin/python" check
"$VENV/bin/lazysnap" --version >/dev/null || die "$VENV/bin/lazysnap does not run"

# --- command, config, docs, units ---------------------------------------------------------------

mkdir -p "$(dirname "$BIN_LINK")"
if [[ -e $BIN_LINK && ! -L $BIN_LINK ]]; then
    die "$BIN_LINK exists and is not a symlink: move it away and run again"
fi
ln -sfn "$VENV/bin/lazysnap" "$BIN_LINK"

# Prefixed installs name prefixed paths; the real root gets the files as written.
rewrite() {
    sed -e "s#/usr/local/bin/lazysnap#$BIN_LINK#g" \
        -e "s#/etc/lazysnap/#$ETC/#g" \
        -e "s#/usr/local/share/doc/lazysnap/#$DOC_DIR/#g" \
        -e "s#^root = \"/var/lib/lazysnap\"#root = \"$STATE\"#" \
        -e "s#^address = \"/run/lazysnap/lazysnap.sock\"#address = \"$SOCKET\"#" \
        "$@"
}

install -d -m 0755 "$ETC"
if [[ -e $CONFIG ]]; then
    say "kept $CONFIG (the current example: $DOC_DIR/example-config.toml)"
else
    rewrite "$REPO/docs/example-config.toml" >"$WORK/config.toml"
    install -m 0644 "$WORK/config.toml" "$CONFIG"
    say "wrote $CONFIG"
fi

rm -rf "$DOC_DIR"
install -d -m 0755 "$DOC_DIR"
cp -R "$REPO/docs/." "$DOC_DIR/"
install -m 0644 "$REPO/README.md" "$DOC_DIR/README.md"

install -d -m 0755 "$UNIT_DIR"
for unit in "${UNITS[@]}"; do
    rewrite "$REPO/systemd/$unit" >"$WORK/$unit"
    install -m 0644 "$WORK/$unit" "$UNIT_DIR/$unit"
done
if systemd_running; then
    systemctl daemon-reload
    # An upgraded venv under a running daemon would mix old and new modules: restart what runs.
    systemctl try-restart "${UNITS[@]}" || say "warning: restarting ${UNITS[*]} failed"
fi

# containerd reaches the daemon at the config's address: print the snippet for that address.
address=$(sed -n 's/^address = "\(.*\)"$/\1/p' "$CONFIG" | head -n 1)
address=${address:-/run/lazysnap/lazysnap.sock}
cat <<EOF
install-node: installed $("$VENV/bin/lazysnap" --version) in $VENV

Next:
  1. edit $CONFIG if needed ([remote] hosts_dir, docker_config, plain_http: the registry
     access containerd has; see $DOC_DIR/configuration.md)
  2. systemctl enable --now lazysnap.service
  3. add to /etc/containerd/config.toml, then systemctl restart containerd:

version = 2
[proxy_plugins]
  [proxy_plugins.lazysnap]
    type = "snapshot"
    address = "$address"

# Kubernetes (CRI): lazysnap as the default snapshotter, with the layer labels it needs
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "lazysnap"
  disable_snapshot_annotations = false

  (merge into existing [plugins."io.containerd.grpc.v1.cri".containerd] tables rather than
  repeating them; details: $DOC_DIR/containerd.md)
EOF
