#!/usr/bin/env bash
# Builds the project's container images from Dockerfile.operator and Dockerfile.dataplane, as they are,
# without a registry or a Docker engine: buildah (overlay storage, chroot isolation, --pull=never) on
# local stand-ins for the two base images, made from Debian packages. Everything is cached under
# ${UMW_TESTENV_CACHE}/images: the base images by version, the build's layers, and cargo's registry and
# target directory (the Dockerfiles' cache mounts), so a warm build only compiles what changed.
#
#   images.sh base                 # only the base images (and the pause image), when missing
#   images.sh build                # the base images when missing, then both images
#   images.sh check                # each image: a non-root user, every shared library its binary needs
#                                  # present in it, and the binary starting in it (chroot)
#   images.sh archive DIR          # docker-archive tarballs of both images and the pause image, for
#                                  # `ctr images import` (the real node imports them)
#   images.sh inspect IMAGE        # the image's OCI configuration, as JSON
#   images.sh --print-names        # the names of the built images, one per line
#
# Base images (stand-ins, tagged with the names the Dockerfiles use, so that they build unchanged):
#   docker.io/library/rust:<version>-bookworm   debootstrap of Debian bookworm (minbase) with the build
#       packages of buildpack-deps that the build needs (gcc, g++, make, perl, pkg-config, libssl-dev, ...),
#       plus this machine's Rust toolchain, whose version must be the one the Dockerfiles name.
#   gcr.io/distroless/cc-debian12:nonroot       the Debian packages distroless itself uses for cc-debian12
#       (base-files, ca-certificates, libc6, libgcc-s1, libgomp1, libssl3, libstdc++6, netbase, tzdata,
#       ...), unpacked with no shell and no package manager, user nonroot (65532).
#   localhost/umw-pause:3.10                    the pod sandbox image of the real node, from pause.c.
# The machine's CA bundle is mounted into every build step, so that cargo reaches crates.io from inside
# the build as it does on the host (through the same proxy, if the host trusts one).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

IMAGES="$UMW_TESTENV_CACHE/images"
OPERATOR_IMAGE="localhost/umw-operator:$UMW_IMAGE_TAG"
DATAPLANE_IMAGE="localhost/umw-dataplane:$UMW_IMAGE_TAG"
PAUSE_IMAGE="localhost/umw-pause:$PAUSE_VERSION"
RUST_VERSION=$(sed -n 's/^FROM rust:\([0-9.]*\)-bookworm.*/\1/p' "$ROOT/Dockerfile.dataplane" | head -1)
[ "$RUST_VERSION" = "$(sed -n 's/^FROM rust:\([0-9.]*\)-bookworm.*/\1/p' "$ROOT/Dockerfile.operator" | head -1)" ] ||
  { echo "[images] error: Dockerfile.operator and Dockerfile.dataplane build with different Rust versions" >&2; exit 1; }
RUST_IMAGE="docker.io/library/rust:$RUST_VERSION-bookworm"
DISTROLESS_IMAGE="gcr.io/distroless/cc-debian12:nonroot"
HOST_CA="${UMW_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v readelf >/dev/null || missing+=(binutils)
  command -v gcc >/dev/null || missing+=(gcc)
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run e2e/testenv/packages.sh (make testenv does)"
  [ "$(id -u)" = 0 ] || die "building images needs root (buildah's overlay storage and chroot isolation)"
}

# buildah with its storage, run state, temporary files (the cache mounts live there) and configuration
# in the cache: nothing of the host's containers setup is read or written.
bh() {
  TMPDIR="$IMAGES/tmp" CONTAINERS_REGISTRIES_CONF="$IMAGES/registries.conf" \
    CONTAINERS_CONF="$IMAGES/containers.conf" CONTAINERS_STORAGE_CONF="$IMAGES/storage.conf" \
    buildah --root "$IMAGES/storage" --runroot "$IMAGES/run" --storage-driver overlay "$@"
}

setup() {
  mkdir -p "$IMAGES/tmp" "$IMAGES/storage" "$IMAGES/run" "$IMAGES/cni"
  # No registry is ever asked: short names resolve to local images only.
  printf 'unqualified-search-registries = []\nshort-name-mode = "permissive"\n' > "$IMAGES/registries.conf"
  # The machine allows no more open files than this: runc must not ask for more.
  printf '[containers]\ndefault_ulimits = ["nofile=%s:%s"]\n[network]\ncni_plugin_dirs = ["/usr/lib/cni"]\nnetwork_config_dir = "%s"\n' \
    "$(ulimit -Hn)" "$(ulimit -Hn)" "$IMAGES/cni" > "$IMAGES/containers.conf"
  printf '[storage]\ndriver = "overlay"\n' > "$IMAGES/storage.conf"
}

have_image() { bh inspect --type image "$1" >/dev/null 2>&1; }

# The Debian mirror apt uses here (UMW_DEBIAN_MIRROR overrides it).
debian_mirror() {
  if [ -n "${UMW_DEBIAN_MIRROR:-}" ]; then echo "$UMW_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
  [ -n "$uri" ] || uri=$(sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)
  [ -n "$uri" ] || die "no Debian mirror found in the apt sources: set UMW_DEBIAN_MIRROR"
  echo "$uri"
}

# Commits DIR as IMAGE (from scratch), with ownership kept, then the given `buildah config` flags.
commit_rootfs() {
  local dir=$1 image=$2 ctr; shift 2
  tar -C "$dir" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$dir.tar" .
  ctr=$(bh from --pull=never scratch)
  bh add "$ctr" "$dir.tar" / >/dev/null
  bh config "$@" "$ctr"
  bh commit --quiet --rm "$ctr" "$image" >/dev/null
  rm -f "$dir.tar"
}

# docker.io/library/rust:<version>-bookworm: Debian with the build tools, and the host's toolchain (made
# again when that toolchain changes).
rust_image() {
  local sysroot version t0=$SECONDS dir
  command -v rustc >/dev/null || die "rustc is missing: the Rust stand-in image carries this machine's toolchain"
  version=$(rustc --version | awk '{print $2}')
  if have_image "$RUST_IMAGE"; then
    bh inspect --type image --format '{{.OCIv1.Config.Env}}' "$RUST_IMAGE" | grep -q "RUST_VERSION=$version[] ]" && return
    bh rmi "$RUST_IMAGE" >/dev/null
  fi
  case "$version" in
    "$RUST_VERSION" | "$RUST_VERSION".*) ;;
    *) die "the Dockerfiles build with Rust $RUST_VERSION but this machine's rustc is $version: install that toolchain (rustup toolchain install $RUST_VERSION) or build the images with Docker" ;;
  esac
  sysroot=$(rustc --print sysroot)
  [ -x "$sysroot/bin/cargo" ] || die "no cargo next to rustc in $sysroot"
  log "making $RUST_IMAGE from Debian bookworm and Rust $version (once, about 3 minutes)"
  dir=$(mktemp -d "$IMAGES/tmp/rust.XXXXXX")
  TEMP_DIRS+=("$dir")
  # What buildpack-deps:bookworm (the base of the rust image) has and the build uses: a C and C++
  # compiler (librdkafka's configure wants c++), make, perl and python3 (librdkafka's build), pkg-config
  # and OpenSSL's and zlib's headers, git and curl for cargo.
  debootstrap --variant=minbase \
    --include=ca-certificates,curl,git,gcc,g++,libc6-dev,make,perl,python3,pkg-config,libssl-dev,zlib1g-dev,file,patch,xz-utils \
    bookworm "$dir/rootfs" "$(debian_mirror)" > "$dir/debootstrap.log" 2>&1 ||
    { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  mkdir -p "$dir/rootfs/usr/local/rust" "$dir/rootfs/usr/local/cargo/bin"
  # The toolchain without its documentation (800 MB of HTML).
  for part in bin lib libexec etc; do
    [ -e "$sysroot/$part" ] && cp -a "$sysroot/$part" "$dir/rootfs/usr/local/rust/"
  done
  for tool in cargo rustc rustdoc; do ln -s "../../rust/bin/$tool" "$dir/rootfs/usr/local/cargo/bin/$tool"; done
  rm -rf "$dir/rootfs/var/cache/apt/archives"/*.deb "$dir/rootfs/var/lib/apt/lists"/*
  commit_rootfs "$dir/rootfs" "$RUST_IMAGE" \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup --env RUST_VERSION="$version" \
    --cmd bash
  rm -rf "$dir"
  log "$RUST_IMAGE made in $((SECONDS - t0))s"
}

# gcr.io/distroless/cc-debian12:nonroot: the Debian packages of distroless's cc image, unpacked.
distroless_image() {
  have_image "$DISTROLESS_IMAGE" && return
  local t0=$SECONDS dir pkg
  # apt-get download takes this machine's release: it must be the one the image is named after.
  [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ] ||
    die "the distroless stand-in (cc-debian12) is made from this machine's Debian packages, and this is not Debian 12 (bookworm)"
  log "making $DISTROLESS_IMAGE from Debian packages (once)"
  dir=$(mktemp -d "$IMAGES/tmp/distroless.XXXXXX")
  TEMP_DIRS+=("$dir")
  mkdir -p "$dir/debs" "$dir/rootfs"
  # distroless's package set for cc-debian12 (its bookworm lock): base (base-files, ca-certificates,
  # libc6, libssl3, netbase, tzdata, media-types, ...) and cc (libgcc-s1, libgomp1, libstdc++6).
  local packages=(base-files ca-certificates libc6 libssl3 netbase openssl tzdata media-types gcc-12-base libgcc-s1
    libgomp1 libstdc++6)
  (cd "$dir/debs" && apt-get download -q "${packages[@]}" > /dev/null 2>&1) ||
    { apt-get update -q > /dev/null && (cd "$dir/debs" && apt-get download -q "${packages[@]}" > /dev/null); } ||
    die "apt-get download of ${packages[*]} failed"
  for pkg in "$dir"/debs/*.deb; do dpkg-deb -x "$pkg" "$dir/rootfs"; done
  local r="$dir/rootfs"
  rm -rf "$r/usr/share/doc" "$r/usr/share/man" "$r/usr/share/info" "$r/usr/share/lintian"
  # What the packages' maintainer scripts would have made: the CA bundle, the users, /tmp and a home.
  mkdir -p "$r/etc/ssl/certs" "$r/tmp" "$r/home/nonroot" "$r/root"
  find "$r/usr/share/ca-certificates/mozilla" -name '*.crt' | sort | xargs cat > "$r/etc/ssl/certs/ca-certificates.crt"
  cat > "$r/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$r/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$r/etc/nsswitch.conf"
  chmod 1777 "$r/tmp"; chmod 700 "$r/root"; chown 65532:65532 "$r/home/nonroot"
  commit_rootfs "$r" "$DISTROLESS_IMAGE" --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  rm -rf "$dir"
  log "$DISTROLESS_IMAGE made in $((SECONDS - t0))s"
}

# localhost/umw-pause:<version>: the sandbox container of every pod on the real node.
pause_image() {
  have_image "$PAUSE_IMAGE" && return
  local dir ctr
  dir=$(mktemp -d "$IMAGES/tmp/pause.XXXXXX")
  TEMP_DIRS+=("$dir")
  gcc -Os -static -Wall -Werror -o "$dir/pause" "$HERE/node/pause.c"
  strip "$dir/pause"
  ctr=$(bh from --pull=never scratch)
  bh copy "$ctr" "$dir/pause" /pause >/dev/null
  bh config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  bh commit --quiet --rm "$ctr" "$PAUSE_IMAGE" >/dev/null
  rm -rf "$dir"
}

build_image() {
  local dockerfile=$1 image=$2 t0=$SECONDS
  [ -r "$HOST_CA" ] || die "no CA bundle at $HOST_CA (set UMW_HOST_CA): cargo inside the build needs it"
  log "building $image from $(basename "$dockerfile")"
  bh bud --quiet --isolation chroot --network host --pull=never --layers \
    -v "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    -f "$dockerfile" -t "$image" "$ROOT" >/dev/null
  log "$image built in $((SECONDS - t0))s"
}

build() {
  need; setup
  rust_image
  distroless_image
  pause_image
  build_image "$ROOT/Dockerfile.operator" "$OPERATOR_IMAGE"
  build_image "$ROOT/Dockerfile.dataplane" "$DATAPLANE_IMAGE"
  # Layers the two builds no longer use (an older build of a changed Dockerfile step).
  bh rmi --prune >/dev/null 2>&1 || true
}

# The path of FILE inside a mounted image root, following symlinks inside that root.
in_root() {
  local root=$1 path=$2 target hops=0
  while [ -L "$root$path" ] && [ $hops -lt 20 ]; do
    target=$(readlink "$root$path")
    case "$target" in /*) path=$target ;; *) path="$(dirname "$path")/$target" ;; esac
    hops=$((hops + 1))
  done
  [ -e "$root$path" ] && echo "$root$path"
}

check_image() {
  local image=$1 binary=$2 ctr root user lib found dir interpreter out failed=0
  have_image "$image" || die "$image is not built: run e2e/testenv/images.sh build (make images)"
  user=$(bh inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
  case "${user%%:*}" in
    "" | 0 | root) log "FAIL $image runs as root (USER is '${user}')"; failed=1 ;;
  esac
  ctr=$(bh from --pull=never "$image")
  root=$(bh mount "$ctr")
  [ -x "$root$binary" ] || { log "FAIL $image has no $binary"; failed=1; }
  if [ -x "$root$binary" ]; then
    interpreter=$(readelf -l "$root$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    if [ -n "$interpreter" ] && ! in_root "$root" "$interpreter" >/dev/null; then
      log "FAIL $image has no $interpreter, the dynamic loader of $binary"; failed=1
    fi
    for lib in $(readelf -d "$root$binary" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
      found=""
      for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; do
        in_root "$root" "$dir/$lib" >/dev/null && { found=1; break; }
      done
      [ -n "$found" ] || { log "FAIL $binary needs $lib, which $image does not have"; failed=1; }
    done
    # The loader resolves the whole tree (libssl needs libcrypto, ...): start it inside the image's root.
    if ! out=$(chroot --userspec=65532:65532 "$root" "$binary" --version 2>&1); then
      log "FAIL $binary does not start in $image: $out"; failed=1
    fi
  fi
  bh umount "$ctr" >/dev/null; bh rm "$ctr" >/dev/null
  [ $failed = 0 ] && log "ok $image: user $user, $(basename "$binary") starts with the image's libraries"
  return $failed
}

check() {
  need; setup
  local failed=0
  check_image "$OPERATOR_IMAGE" /usr/local/bin/umw-operator || failed=1
  check_image "$DATAPLANE_IMAGE" /usr/local/bin/umw-dataplane || failed=1
  return $failed
}

archive() {
  local out=$1 image file
  need; setup
  mkdir -p "$out"
  for image in "$OPERATOR_IMAGE" "$DATAPLANE_IMAGE" "$PAUSE_IMAGE"; do
    have_image "$image" || die "$image is not built: run e2e/testenv/images.sh build (make images)"
    file="$out/$(basename "${image%%:*}").tar"
    rm -f "$file"
    bh push --quiet "$image" "docker-archive:$file:$image" >/dev/null
  done
}

# On exit: the temporary directories of a step that failed, and the cache of blob digests that buildah
# keeps in /var/lib/containers whatever its storage root (with the directories it made for it).
TEMP_DIRS=()
BLOB_CACHE=/var/lib/containers/cache/blob-info-cache-v1.boltdb
cleanup() {
  [ ${#TEMP_DIRS[@]} -eq 0 ] || rm -rf "${TEMP_DIRS[@]}"
  if [ -n "$REMOVE_BLOB_CACHE" ]; then
    rm -f "$BLOB_CACHE"
    rmdir /var/lib/containers/cache /var/lib/containers 2>/dev/null || true
  fi
}
REMOVE_BLOB_CACHE=""
case "${1:-}" in
  base | build | check | archive | inspect) [ -e "$BLOB_CACHE" ] || REMOVE_BLOB_CACHE=1; trap cleanup EXIT ;;
esac

case "${1:-}" in
  base) need; setup; rust_image; distroless_image; pause_image ;;
  build) build ;;
  check) check ;;
  archive) [ $# -ge 2 ] || die "usage: $0 archive DIR"; archive "$2" ;;
  inspect) [ $# -ge 2 ] || die "usage: $0 inspect IMAGE"; need; setup; bh inspect --type image "$2" ;;
  --print-names) printf '%s\n' "$OPERATOR_IMAGE" "$DATAPLANE_IMAGE" "$PAUSE_IMAGE" ;;
  *) die "usage: $0 build | check | archive DIR | inspect IMAGE | --print-names" ;;
esac
