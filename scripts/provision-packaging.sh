#!/usr/bin/env bash
# Provisions what building and testing the Debian package needs, from package registries
# only, into caches outside the clone (idempotent; offline once done):
#
#   Debian packages   lintian, dpkg-dev (dpkg-shlibdeps), debootstrap, man-db, systemd
#                     (systemd-analyze), installed with apt when missing
#   cargo-deb         pinned, under ${CARGO_HOME:-~/.cargo}/bin
#   a bookworm chroot debootstrap --variant=minbase, with the package's dependencies
#                     downloaded into it, as ${XDG_CACHE_HOME:-~/.cache}/moat-package/
#                     bookworm-minbase.tar.gz (MOAT_DEBIAN_MIRROR names another mirror)
#
# Needs root (apt, debootstrap). scripts/test.sh runs it right after setup when it is root;
# scripts/package.sh and scripts/test-package.sh run it too, and then find everything in
# place.
set -euo pipefail

CARGO_DEB_VERSION="3.8.0"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/moat-package"
base_tarball="$cache/bookworm-minbase.tar.gz"
mirror="${MOAT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

step() { echo "==> $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "error: provisioning the package tools needs root (apt-get, debootstrap)" >&2
  exit 1
fi

missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v man >/dev/null || missing+=(man-db)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

bin="${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deb"
if [ "$("$bin" --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  step "cargo install cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --force >&2
fi

# The tarball's first entry, ./, becomes the chroot's root directory: it must be 0755, or
# no user but root can reach anything in the chroot (the service user could not even load
# its shared libraries). Tarballs cached before that was ensured are made again.
root_mode() {
  python3 - "$1" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tarball:
    first = tarball.next()
print(f"{first.mode:o}" if first is not None and first.name in (".", "./") else "none")
PY
}
if [ -f "$base_tarball" ] && [ "$(root_mode "$base_tarball" 2>/dev/null)" != 755 ]; then
  step "the cached $base_tarball has a root directory other than 0755; making it again"
  rm -f "$base_tarball"
fi

if [ ! -f "$base_tarball" ]; then
  step "debootstrap --variant=minbase bookworm (cached in $base_tarball)"
  mkdir -p "$cache"
  bootstrap="$(mktemp -d "${TMPDIR:-/tmp}/moat-bootstrap.XXXXXX")"
  # Never delete a tree something is still mounted into (a failed debootstrap may leave
  # its /proc mounted).
  trap 'grep -q " $bootstrap/" /proc/mounts || rm -rf "$bootstrap"' EXIT
  debootstrap --variant=minbase bookworm "$bootstrap" "$mirror" >&2
  # The package's dependencies come from the tarball in the test, without a mirror: apt's
  # lists and the .debs it would fetch are kept in it.
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C chroot "$bootstrap" apt-get -q update >&2
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C chroot "$bootstrap" \
    apt-get -q -y --download-only install adduser libstdc++6 libgcc-s1 >&2
  # mktemp -d made the root 0700; a system's / is 0755.
  chmod 0755 "$bootstrap"
  tar -C "$bootstrap" --exclude=./proc/* --exclude=./dev/* --exclude=./sys/* \
    -czf "$base_tarball.partial" .
  [ "$(root_mode "$base_tarball.partial")" = 755 ] || {
    echo "error: $base_tarball.partial: its root directory is not 0755" >&2
    exit 1
  }
  mv "$base_tarball.partial" "$base_tarball"
fi
