#!/usr/bin/env bash
# Build the big realistic test image ("pybig": Debian minbase + python3 + numpy/pandas/sympy/...,
# 3 gzip layers, ~178 MB compressed, ~18k files) as an OCI layout, cached OUTSIDE the clone so a
# fresh clone or `git clean` does not cost another ~5 minutes and a trip to the Debian mirror.
#
#   scripts/build-test-images.sh            build if missing, else print where it is
#   LAZYSNAP_TEST_IMAGES=/dir  ...          cache directory (default /var/cache/lazysnap-test-images)
#   LAZYSNAP_DEBIAN_MIRROR=http://...       mirror for debootstrap (default: the one apt uses)
#   --force                                 rebuild even if cached
#
# Result: $LAZYSNAP_TEST_IMAGES/pybig is an OCI layout with tag "latest"; tests push it with skopeo.
set -euo pipefail

CACHE=${LAZYSNAP_TEST_IMAGES:-/var/cache/lazysnap-test-images}
LAYOUT=$CACHE/pybig
HERE=$(cd "$(dirname "$0")" && pwd)
EXTRAS="python3-numpy python3-pandas python3-sympy python3-lxml python3-requests python3-yaml
python3-jinja2 python3-pygments python3-babel python3-docutils python3-sqlalchemy"

log() { printf '[build-test-images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Bump when the recipe changes what ends up in the image: a cache from an older recipe is rebuilt.
RECIPE=2  # 2: apt's pkgcache.bin/srcpkgcache.bin (78 MB) no longer baked into layers 2 and 3
if [[ ${1:-} != --force && $(cat "$LAYOUT/.complete" 2>/dev/null) == "recipe $RECIPE" ]]; then
    log "cached: $LAYOUT"
    exit 0
fi
[[ -d $LAYOUT ]] && log "cached $LAYOUT is from another recipe (want $RECIPE): rebuilding"
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, umoci unpack)"
for tool in debootstrap umoci python3 chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done

default_mirror() {
    # The mirror apt already uses on this machine (deb822 or one-line format).
    local uri
    uri=$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
    [[ -n $uri ]] || uri=$(grep -hoE '^deb +https?://[^ ]+/debian/? ' /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${LAZYSNAP_DEBIAN_MIRROR:-$(default_mirror)}

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
ROOTFS=$WORK/bundle/rootfs
cleanup() {
    # Never leave a half-built layout or a chroot mount behind.
    for m in "$ROOTFS/dev" "$ROOTFS/proc"; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

enter_chroot() {
    mount -t proc proc "$ROOTFS/proc"
    mount --bind /dev "$ROOTFS/dev"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
    chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
}
leave_chroot() {
    umount "$ROOTFS/dev" "$ROOTFS/proc"
    rm -f "$ROOTFS/usr/sbin/policy-rc.d"
    # Caches would only bloat the layer.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/apt/*
}
apt_in_chroot() {
    enter_chroot
    chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get -q update >/dev/null
    chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
        apt-get -q install -y --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 \
        || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install $* failed in the chroot"; }
    leave_chroot
}
repack() {
    log "  repack layer: $1"
    umoci repack --refresh-bundle --image "$WORK/oci:pybig" --history.comment "$1" "$WORK/bundle"
}

log "building pybig into $LAYOUT (mirror $MIRROR); takes 1-5 min"
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:pybig"
umoci unpack --image "$WORK/oci:pybig" "$WORK/bundle" >/dev/null

log "1/3 debootstrap --variant=minbase bookworm"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/lib/apt/lists/*
repack "debootstrap minbase bookworm"

log "2/3 apt-get install python3"
apt_in_chroot python3
repack "apt-get install python3"

log "3/3 apt-get install $(echo $EXTRAS)"
# shellcheck disable=SC2086  # word splitting intended: one package per word
apt_in_chroot $EXTRAS
repack "apt-get install python extras"

umoci config --image "$WORK/oci:pybig" --config.cmd /usr/bin/python3 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
python3 "$HERE/images/normalize_oci.py" "$WORK/oci" pybig latest
umoci rm --image "$WORK/oci:pybig"
umoci gc --layout "$WORK/oci"

echo "recipe $RECIPE" >"$WORK/oci/.complete"
rm -rf "$LAYOUT"
mv "$WORK/oci" "$LAYOUT"
log "done: $LAYOUT ($(du -sh "$LAYOUT" | cut -f1))"
