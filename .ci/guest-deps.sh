#!/usr/bin/env bash
# Packages for the real-VM tests (tests/guest): QEMU (qemu-system-x86, which brings
# qemu-storage-daemon and the SeaBIOS firmware), qemu-img, e2fsprogs, and the Debian cloud kernel
# and busybox-static .debs, downloaded (not installed) into the guest cache that the harness
# unpacks once ($VBLOCK_GUEST_CACHE, default ~/.cache/vblock-guest). Never fails the CI run:
# where something cannot be had, the guest tests skip and say why.
set -uo pipefail

CACHE="${VBLOCK_GUEST_CACHE:-$HOME/.cache/vblock-guest}"
export DEBIAN_FRONTEND=noninteractive

if ! command -v apt-get >/dev/null; then
    echo "guest-deps: no apt-get; guest tests will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo -n"; else
        echo "guest-deps: not root and no sudo; guest tests will skip" >&2
        exit 0
    fi
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v e2fsck >/dev/null && command -v debugfs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get update -qq || true
    $SUDO apt-get install --no-install-recommends -y -qq "${need[@]}" >/dev/null \
        || echo "guest-deps: could not install ${need[*]}; guest tests will skip" >&2
fi

mkdir -p "$CACHE/debs"
cd "$CACHE/debs" || exit 0
if ! ls linux-image-[0-9]*-cloud-amd64_*.deb >/dev/null 2>&1 || ! ls busybox-static_*.deb >/dev/null 2>&1; then
    apt-get download busybox-static linux-image-cloud-amd64 >/dev/null 2>&1 || true
    meta=$(ls linux-image-cloud-amd64_*.deb 2>/dev/null | tail -1)
    if [ -n "$meta" ]; then
        kpkg=$(dpkg-deb -f "$meta" Depends | sed 's/ (.*//; s/,.*//')
        apt-get download "$kpkg" >/dev/null 2>&1 || echo "guest-deps: could not download $kpkg" >&2
    else
        echo "guest-deps: could not download linux-image-cloud-amd64 / busybox-static" >&2
    fi
fi
exit 0
