#!/usr/bin/env bash
# Builds the Debian package of moat (Debian 12 bookworm) and checks it with lintian.
#
#   scripts/package.sh [--deb-version VERSION] [--output DIR] [--fast] [--no-lintian]
#
#   --deb-version  the package version, revision included (default: the workspace version
#                  with revision 1, e.g. 0.1.0-1); also read from $MOAT_DEB_VERSION
#   --output       where the .deb files go (default: target/debian)
#   --fast         faster, larger compression (for tests)
#   --no-lintian   skip lintian (for a package that is only a test fixture)
#
# Steps: the tools (scripts/provision-packaging.sh: cargo-deb, lintian), the ONNX Runtime library
# (packaging/provision-onnxruntime.sh), release builds of moatd and moatctl, their manual
# pages and shell completions, the package (moat_*.deb, with its debug symbols in
# moat-dbgsym_*.ddeb), then lintian, which fails the script on any error. Progress goes to
# stderr; the last line on stdout is the path of the .deb.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

deb_version="${MOAT_DEB_VERSION:-}"
output="$root/target/debian"
fast=0
lint=1
while [ $# -gt 0 ]; do
  case "$1" in
    --deb-version) deb_version="${2:?--deb-version needs a value}"; shift 2 ;;
    --output) output="${2:?--output needs a directory}"; shift 2 ;;
    --fast) fast=1; shift ;;
    --no-lintian) lint=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

step() { echo "==> $*" >&2; }

step "package tools (scripts/provision-packaging.sh)"
bash scripts/provision-packaging.sh

step "ONNX Runtime library (packaging/provision-onnxruntime.sh)"
packaging/provision-onnxruntime.sh >&2

step "cargo build --release moatd moatctl"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --release --locked --bin moatd --bin moatctl >&2
target_dir="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
moatd="$target_dir/release/moatd"
moatctl="$target_dir/release/moatctl"

# The manual pages and completions come from the binaries' own command-line definitions,
# so they cannot drift from them. Paths must match the assets in daemon/Cargo.toml.
step "manual pages and shell completions (target/package)"
generated="$root/target/package"
rm -rf "$generated"
mkdir -p "$generated/man" "$generated/completions" "$generated/onnxruntime"
"$moatd" man --dir "$generated/man"
"$moatctl" man --dir "$generated/man"
for bin in "$moatd" "$moatctl"; do
  name="$(basename "$bin")"
  "$bin" completions bash >"$generated/completions/$name.bash"
  "$bin" completions zsh >"$generated/completions/_$name"
  "$bin" completions fish >"$generated/completions/$name.fish"
done
for file in "$generated"/man/* "$generated"/completions/*; do
  if [ ! -s "$file" ]; then
    echo "error: $file is empty" >&2
    exit 1
  fi
done
grep -q '^\.TH' "$generated/man/moatd.8" "$generated/man/moatctl.1" || {
  echo "error: the manual pages are not roff (no .TH line)" >&2
  exit 1
}

# ONNX Runtime's notices for the third-party code inside it, from the pinned wheel the
# library came from (its hash was checked by provision-onnxruntime.sh).
wheels=("$root"/local/downloads/onnxruntime-1.32.0-*.whl)
if [ ! -f "${wheels[0]}" ]; then
  echo "error: no onnxruntime 1.32.0 wheel in local/downloads; run scripts/setup.sh" >&2
  exit 1
fi
python3 - "${wheels[0]}" "$generated/onnxruntime/ThirdPartyNotices.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    open(sys.argv[2], "wb").write(wheel.read("onnxruntime/ThirdPartyNotices.txt"))
PY

step "cargo deb${deb_version:+ --deb-version $deb_version}"
mkdir -p "$output"
deb_args=(-p moat-daemon --no-build --locked --output "$output")
[ -n "$deb_version" ] && deb_args+=(--deb-version "$deb_version")
[ "$fast" = 1 ] && deb_args+=(--fast)
# cargo-deb warns that the generated files under target/package are not build outputs,
# which is what they are meant to be; that one warning is dropped.
deb="$(cargo deb "${deb_args[@]}" 2> >(grep -v -e "does not match the pattern, and will not be built" \
  -e "^warning: Only source paths starting with exactly 'target/release/'" >&2) | tail -n 1)"
if [ ! -f "$deb" ]; then
  echo "error: cargo deb did not report a package (got: $deb)" >&2
  exit 1
fi

# The Depends field is written out in daemon/Cargo.toml; it must cover what dpkg-shlibdeps
# finds every binary and library in the package needs.
step "Depends covers the shared libraries the package needs"
check="$(mktemp -d)"
trap 'rm -rf "$check"' EXIT
dpkg-deb -x "$deb" "$check/root"
dpkg-deb -e "$deb" "$check/root/DEBIAN"
mkdir "$check/debian"
: >"$check/debian/control"
mapfile -t elf_files < <(find "$check/root" -path "$check/root/DEBIAN" -prune -o -type f -print |
  while read -r file; do [ "$(head -c 4 "$file" | tr -d '\0')" = $'\x7fELF' ] && echo "$file"; done)
needed="$(cd "$check" && dpkg-shlibdeps -O "${elf_files[@]}" 2>"$check/shlibdeps.log" |
  sed -n 's/^shlibs:Depends=//p')" || {
  cat "$check/shlibdeps.log" >&2
  exit 1
}
declared="$(dpkg-deb -f "$deb" Depends)"
IFS=',' read -ra needed_list <<<"$needed"
for dependency in "${needed_list[@]}"; do
  read -r name _ version <<<"$(echo "$dependency" | tr -d '()')"
  have="$(echo "$declared" | tr ',' '\n' | tr -d '()' | awk -v n="$name" '$1 == n { print $3 }')"
  if [ -z "$have" ] || { [ -n "$version" ] && ! dpkg --compare-versions "$have" ge "$version"; }; then
    echo "error: the package needs$dependency but Depends says: $declared" >&2
    echo "       (fix depends in [package.metadata.deb], daemon/Cargo.toml)" >&2
    exit 1
  fi
done
echo "    needed: $needed; declared: $declared" >&2

if [ "$lint" = 1 ]; then
  # The .deb only: cargo-deb's moat-dbgsym .ddeb lacks the fields lintian knows Debian's
  # generated debug packages by, and would be held to the rules of a normal package.
  step "lintian $(basename "$deb")"
  # Warnings and errors are printed; any error fails the build. The overrides, each with
  # its reason, are in packaging/debian/lintian-overrides (shipped in the package).
  lintian --fail-on error --display-level '>=warning' "$deb" >&2
  echo "    lintian: no errors; overridden:" >&2
  grep -v '^#' packaging/debian/lintian-overrides | sed 's/^/      /' >&2
fi

echo "$deb"
