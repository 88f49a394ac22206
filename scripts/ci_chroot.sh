#!/usr/bin/env bash
# Run the test suite on a newer QGIS inside a Debian chroot (root only).
#
#   scripts/ci_chroot.sh [trixie|sid] [command...]
#
#   trixie (default): Debian 13 - QGIS 3.40 LTR, Python 3.13, Debian's python3-torch.
#   sid:              Debian unstable - QGIS 3.44 (moves: on request only, not in CI).
#   command:          what to run in the checkout inside the chroot (default: the suite, as `make test`).
#
# The chroot is built with debootstrap from the Debian mirror this machine's apt uses, gets the
# Makefile's APT_PACKAGES plus Debian's torch/torchvision, Xvfb and make, and a --system-site-packages
# venv at /opt/menet-venv with the Makefile's PIP_PACKAGES (not PIP_TORCH: Debian's torch is the point).
# It is cached outside the checkout (MENET_CI_CACHE, default /var/cache/menet-ci) as a folder and a
# tarball named after a hash of the package lists: a second run reuses the folder, a fresh machine with
# the tarball restores it in seconds, and a changed package list builds a new one.
# The checkout and ../shared are bind-mounted at their own paths, with /proc /sys /dev /dev/pts /dev/shm;
# everything is unmounted on exit, whatever happens.  The suite runs under `env -i`: nothing from the
# host's environment (PATH, PIP_*, PYTHONPATH, ...) leaks in except CI, DISPLAY/XAUTHORITY (with
# /tmp/.X11-unix bound) and MENET_* (the tests' own settings, e.g. MENET_GUI_DISPLAY).
set -euo pipefail
# The whole script is one block, read before it runs: editing or checking out another version of this
# file while a run is going (the suite takes a while) cannot change what the run executes.
{
SUITE=${1:-trixie}
[[ $# -gt 0 ]] && shift
case "$SUITE" in
  trixie|sid|forky) ;;
  *) echo "ci_chroot: unknown suite '$SUITE' (trixie, sid, forky)" >&2; exit 2 ;;
esac
[[ $(id -u) -eq 0 ]] || { echo "ci_chroot: needs root (debootstrap, chroot, mount)" >&2; exit 2; }

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd -P)
SHARED=$(cd "$CHECKOUT/.." && pwd -P)/shared
CACHE=${MENET_CI_CACHE:-/var/cache/menet-ci}
VENV=/opt/menet-venv
# Bump when the recipe below changes in a way the package lists do not show.
RECIPE=1
# In the chroot on top of the Makefile's APT_PACKAGES: Debian's torch, the tools the tests call,
# an X server for the desktop GUI test, certificates for pip.
CHROOT_EXTRA="python3-torch python3-torchvision python3-pip make xvfb xauth ca-certificates locales-all"
# On the host, to build the chroot.
HOST_TOOLS="debootstrap zstd"

log() { printf 'ci_chroot[%s]: %s\n' "$SUITE" "$*" >&2; }

make_var() { make -s --no-print-directory -C "$CHECKOUT" "print-$1"; }

debian_mirror() {
  # The first plain Debian archive URI in this machine's apt sources (one-line or deb822 format).
  if [[ -n ${MENET_CI_MIRROR:-} ]]; then echo "$MENET_CI_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?//p' \
        | awk '{print $1}' | grep -E '/debian/?$' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

missing=""
for tool in $HOST_TOOLS; do dpkg -s "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [[ -n $missing ]]; then
  log "installing on the host:$missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

APT_LIST="$(make_var APT_PACKAGES) $CHROOT_EXTRA"
PIP_LIST=$(make_var PIP_PACKAGES)
read -r -a PIP_WORDS <<< "$PIP_LIST"  # words, not globs: "dask[distributed]==..." stays as written
MIRROR=$(debian_mirror)
KEY=$(printf '%s\n' "$RECIPE" "$SUITE" "$APT_LIST" "$PIP_LIST" | sha256sum | cut -c1-12)
ROOT="$CACHE/$SUITE-$KEY"
TARBALL="$CACHE/$SUITE-$KEY.tar.zst"
mkdir -p "$CACHE/apt-archives"

# ---- mounts: tracked, unmounted in reverse order on any exit -------------------------------------
MOUNTS=()
unmount_all() {
  local i
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || log "could not unmount ${MOUNTS[i]}"
  done
  MOUNTS=()
}
trap unmount_all EXIT
trap 'exit 130' INT TERM

bind() {  # bind SOURCE TARGET-INSIDE-ROOT
  local target="$ROOT$2"
  if [[ -d $1 ]]; then mkdir -p "$target"; else mkdir -p "$(dirname "$target")"; touch "$target"; fi
  mount --bind "$1" "$target"
  MOUNTS+=("$target")
}

mount_system() {
  mkdir -p "$ROOT/proc"; mount -t proc proc "$ROOT/proc"; MOUNTS+=("$ROOT/proc")
  bind /sys /sys
  bind /dev /dev
  bind /dev/pts /dev/pts
  bind /dev/shm /dev/shm
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # pip and curl inside trust what this host trusts (a TLS-inspecting proxy's CA included).
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/menet-host-ca.crt"
}

no_mounts_below() {
  # Refuse to delete a tree that still has something mounted in it (a bound /dev would go with it).
  ! findmnt -rn -o TARGET | grep -q -F -- "$1/"
}

remove_tree() {
  if [[ -e $1 ]]; then
    no_mounts_below "$1" || { echo "ci_chroot: refusing to delete $1: mounts inside" >&2; exit 1; }
    rm -rf --one-file-system -- "$1"
  fi
}

in_root() {  # run a command inside the chroot with a clean environment
  local passed=() name
  # The project's own knobs (MENET_GUI_DISPLAY, MENET_GUI_TIMEOUT, ...) pass through, nothing else.
  for name in $(compgen -e); do [[ $name == MENET_* && $name != MENET_CI_* ]] && passed+=("$name=${!name}"); done
  env -i "${passed[@]}" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive PIP_CERT=/etc/menet-host-ca.crt SSL_CERT_FILE=/etc/menet-host-ca.crt \
    REQUESTS_CA_BUNDLE=/etc/menet-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    VENV="$VENV" \
    ${CI:+CI=$CI} ${DISPLAY:+DISPLAY=$DISPLAY} ${XAUTHORITY:+XAUTHORITY=$XAUTHORITY} \
    chroot "$ROOT" "$@"
}

build_root() {
  local work="$ROOT.building"
  remove_tree "$work"
  log "debootstrap $SUITE from $MIRROR into $work"
  debootstrap --variant=minbase --cache-dir="$CACHE/apt-archives" "$SUITE" "$work" "$MIRROR" \
    /usr/share/debootstrap/scripts/sid > "$CACHE/$SUITE-debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/$SUITE-debootstrap.log" >&2; log "debootstrap failed (log: $CACHE/$SUITE-debootstrap.log)"; exit 1; }
  local final=$ROOT; ROOT=$work
  mount_system
  bind "$CACHE/apt-archives" /var/cache/apt/archives
  echo 'force-unsafe-io' > "$ROOT/etc/dpkg/dpkg.cfg.d/menet-ci-unsafe-io"
  printf 'APT::Install-Recommends "false";\nAPT::Keep-Downloaded-Packages "true";\n' > "$ROOT/etc/apt/apt.conf.d/90menet-ci"
  # sid's Release file carries a Valid-Until; a mirror snapshot older than that (as here) is refused.
  [[ $SUITE == sid ]] && echo 'Acquire::Check-Valid-Until "false";' >> "$ROOT/etc/apt/apt.conf.d/90menet-ci"
  log "apt-get install: $APT_LIST"
  in_root apt-get update -qq
  # shellcheck disable=SC2086
  in_root apt-get install -y -qq $APT_LIST > "$CACHE/$SUITE-apt.log" 2>&1 \
    || { tail -n 30 "$CACHE/$SUITE-apt.log" >&2; log "apt-get install failed"; exit 1; }
  log "venv $VENV + pip: $PIP_LIST"
  in_root /usr/bin/python3 -m venv --system-site-packages "$VENV"
  in_root "$VENV/bin/python" -m pip install -q "${PIP_WORDS[@]}"
  touch "$ROOT$VENV/.installed"
  # (no apt-get clean: the archives are the host's cache, bound in, kept for the next build)
  unmount_all
  rm -f "$ROOT/etc/dpkg/dpkg.cfg.d/menet-ci-unsafe-io"
  ROOT=$final
  mv "$work" "$ROOT"
  log "caching $TARBALL"
  tar -C "$ROOT" --numeric-owner -I 'zstd -T0 -3 -q' -cf "$TARBALL.part" . && mv "$TARBALL.part" "$TARBALL"
}

# ---- get the chroot: folder, else tarball, else build ---------------------------------------------
t0=$SECONDS
if [[ -f $ROOT/.menet-ci-ready ]]; then
  log "reusing $ROOT"
elif [[ -f $TARBALL ]]; then
  log "restoring $TARBALL"
  remove_tree "$ROOT"; mkdir -p "$ROOT"
  tar -C "$ROOT" --numeric-owner -I 'zstd -T0 -q' -xf "$TARBALL"
  touch "$ROOT/.menet-ci-ready"
else
  # Old chroots/tarballs of this suite (other package lists) only take disk space.
  for old in "$CACHE/$SUITE"-*; do
    [[ $old == "$ROOT" || $old == "$TARBALL" || $old == *.log ]] && continue
    if [[ -d $old ]]; then remove_tree "$old"; else rm -f -- "$old"; fi
  done
  build_root
  touch "$ROOT/.menet-ci-ready"
fi
log "chroot ready in $(( SECONDS - t0 )) s: QGIS $(in_root dpkg-query -W -f='${Version}' qgis), $(in_root /usr/bin/python3 -V)"

# ---- run -------------------------------------------------------------------------------------------
# Earlier runs' pytest folders live on in the cached chroot's /tmp (GBs each): start from none.
rm -rf --one-file-system -- "$ROOT"/tmp/pytest-of-*
mount_system
bind "$CHECKOUT" "$CHECKOUT"
[[ -d $SHARED ]] && bind "$SHARED" "$SHARED"
[[ -d /tmp/.X11-unix && -n ${DISPLAY:-} ]] && bind /tmp/.X11-unix /tmp/.X11-unix
if [[ $# -eq 0 ]]; then
  # The Makefile's own test target, with this chroot's venv, no pip torch, and a QGIS profile of its own.
  set -- make test "VENV=$VENV" PIP_TORCH= "XDG_DATA_HOME=$CHECKOUT/build/qgis-profile-$SUITE"
fi
t1=$SECONDS
status=0
in_root /bin/bash -c 'cd "$1" && shift && exec "$@"' run "$CHECKOUT" "$@" </dev/null || status=$?
log "ran in $(( SECONDS - t1 )) s (exit $status); total $(( SECONDS - t0 )) s"
exit $status
}
