#!/usr/bin/env bash
# Build the lm-compose images, and check the CPU one from the inside, on a machine
# without Docker Hub, without a container daemon and without download.pytorch.org
# (the dev machines): buildah (storage driver vfs, --isolation chroot) as root, on a
# base image made here with debootstrap.  `make images-local` runs it; see
# images/README.md ("Building without Docker Hub") for what it needs and what it
# recorded.
#
#   images/build-local.sh [cpu|cuda|all] [--check-only] [--rebuild-base|--from-scratch] [--clean]
#
#   cpu (default)   build images/Dockerfile.cpu, then run images/check_image.py in it
#                   as uid 1000 and as an arbitrary uid in group 0
#   cuda            build images/Dockerfile.cuda as far as this machine allows (see
#                   images/README.md) and run the same check in it, on the CPU: no GPU here
#   --check-only    only the in-image check of an already built image
#   --rebuild-base  make the debootstrap base again even if it exists
#   --from-scratch  --rebuild-base, and no cached layers either (what a first build on a machine costs)
#   --clean         remove the built images and the build cache afterwards (frees ~11 GB of
#                   vfs storage; by default they are kept)
#
# Environment (defaults in brackets):
#   IMAGE_REPOSITORY, IMAGE_TAG   [ghcr.io/lm-compose/lm-compose, 0.1.0] as in the Makefile
#   LOCAL_BASE_IMAGE              [localhost/lm-compose-base:bookworm-py311]
#   LOCAL_WORK                    [/var/tmp/lm-compose-images]  debootstrap root fs and logs
#   DEBIAN_MIRROR                 [http://deb.debian.org/debian]
#   CA_BUNDLE                     [/etc/ssl/certs/ca-certificates.crt] mounted read-only over the
#                                 image's bundle during RUN steps (a TLS-re-signing network); never copied
#   TORCH_WHEELS                  [pip's find-links, else /opt/wheels] folder with the torch 2.13.0
#                                 +cpu wheel, mounted at /wheels for the CPU build
#   TORCH_SOURCE_CPU              [--find-links /wheels]
#   TORCH_SOURCE_CUDA             [--index-url https://pypi.org/simple] (PyPI's Linux torch is a CUDA build)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIND=cpu CHECK_ONLY=0 REBUILD_BASE=0 CLEAN=0 NO_CACHE=()
for arg in "$@"; do
  case "$arg" in
    cpu|cuda|all) KIND=$arg ;;
    --check-only) CHECK_ONLY=1 ;;
    --rebuild-base) REBUILD_BASE=1 ;;
    --from-scratch) REBUILD_BASE=1; NO_CACHE=(--no-cache) ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "build-local.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-ghcr.io/lm-compose/lm-compose}
IMAGE_TAG=${IMAGE_TAG:-0.1.0}
BASE=${LOCAL_BASE_IMAGE:-localhost/lm-compose-base:bookworm-py311}
WORK=${LOCAL_WORK:-/var/tmp/lm-compose-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -z "${TORCH_WHEELS:-}" ]; then
  TORCH_WHEELS=$(pip config get global.find-links 2>/dev/null || true)
  TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
fi
TORCH_SOURCE_CPU=${TORCH_SOURCE_CPU:---find-links /wheels}
TORCH_SOURCE_CUDA=${TORCH_SOURCE_CUDA:---index-url https://pypi.org/simple}
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
BUILDAH="buildah --storage-driver vfs"

say() { printf '\n== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "build-local.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (buildah with vfs and chroot isolation; debootstrap)"
for tool in buildah debootstrap; do
  command -v $tool >/dev/null || die "$tool is not installed: apt-get install -y buildah debootstrap"
done
[ -f "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not found (set CA_BUNDLE)"
mkdir -p "$WORK"
LOG="$WORK/build-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee -a "$LOG") 2>&1
say "lm-compose images, local build: commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)'), log $LOG"

# -- 1. the base: debootstrap minbase bookworm + python3 3.11 in a venv ---------------------------
base() {
  if [ $REBUILD_BASE = 0 ] && $BUILDAH inspect --type image "$BASE" >/dev/null 2>&1; then
    say "base $BASE exists (--rebuild-base to make it again)"; return
  fi
  local started=$SECONDS
  say "debootstrap --variant=minbase bookworm -> $WORK/rootfs"
  rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" "$MIRROR"
  tar -C "$WORK/rootfs" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      --exclude='./var/cache/apt/archives/*.deb' -cf "$WORK/rootfs.tar" .
  rm -rf "$WORK/rootfs"
  $BUILDAH bud --isolation chroot --pull=never --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
      -f "$ROOT/images/Containerfile.local-base" -t "$BASE" "$WORK"
  rm -f "$WORK/rootfs.tar"
  say "base $BASE made in $((SECONDS - started)) s"
}

# -- 2. the images, from the unchanged Dockerfiles with build arguments ---------------------------
build() {  # kind
  local kind=$1 image="$IMAGE_REPOSITORY:$IMAGE_TAG-$1" started=$SECONDS
  # vfs copies the whole file system for every cached layer: the CUDA image (~9 GB) is built
  # without layer caching (one working container, one commit) so that it fits on the disk
  local layers=${LOCAL_LAYERS:-$([ "$kind" = cpu ] && echo true || echo false)}
  local args=(--isolation chroot --layers="$layers" --pull=never -f "$ROOT/images/Dockerfile.$kind" -t "$image"
              --build-arg "PYTHON_IMAGE=$BASE" --build-arg "LMCOMPOSE_VERSION=$IMAGE_TAG"
              --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  if [ "$kind" = cpu ]; then
    ls "$TORCH_WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
      || die "no torch-2.13.0+cpu wheel in $TORCH_WHEELS (set TORCH_WHEELS, or TORCH_SOURCE_CPU='--index-url https://download.pytorch.org/whl/cpu')"
    args+=(--volume "$TORCH_WHEELS:/wheels:ro" --build-arg "TORCH_SOURCE=$TORCH_SOURCE_CPU")
  else
    args+=(--build-arg "TORCH_SOURCE=$TORCH_SOURCE_CUDA")
  fi
  say "buildah bud $kind -> $image"
  $BUILDAH bud "${args[@]}" ${NO_CACHE[@]+"${NO_CACHE[@]}"} "$ROOT"
  local seconds=$((SECONDS - started))
  local size
  size=$($BUILDAH images --format '{{.Size}}' "$image" | head -1)
  say "built $image in ${seconds} s ($((seconds / 60)) min $((seconds % 60)) s), size $size"
  echo "BUILD_RESULT kind=$kind image=$image seconds=$seconds size=$size"
}

# -- 3. the check inside the image ------------------------------------------------------------------
check() {  # kind
  local kind=$1 image="$IMAGE_REPOSITORY:$IMAGE_TAG-$1" ctr started=$SECONDS
  ctr=$($BUILDAH from --pull=never "$image")
  trap '$BUILDAH rm "$ctr" >/dev/null 2>&1 || true' RETURN
  # offline: chroot isolation cannot make a network namespace (--network none is refused), so
  # buildah itself runs in a new, empty one (unshare --net: only a loopback that is down)
  local run=(unshare --net $BUILDAH run --isolation chroot --volume "$ROOT/images/check_image.py:/opt/check/check_image.py:ro"
             --env HF_HUB_OFFLINE=1 --env HF_DATASETS_OFFLINE=1)
  # in the CUDA image too the components run on the CPU (no GPU here; the CUDA path is benchmarks/gpu_check.sh's)
  local extra=()
  say "in-image check ($kind): as the image's user (uid 1000)"
  "${run[@]}" --user 1000:0 "$ctr" -- python3 /opt/check/check_image.py --kind "$kind" --expect-uid 1000 "${extra[@]}"
  say "in-image check ($kind): as an arbitrary uid in group 0 (OpenShift style)"
  "${run[@]}" --user 123456789:0 --env HOME=/home/lmcompose "$ctr" -- \
      python3 /opt/check/check_image.py --kind "$kind" --expect-uid 123456789 "${extra[@]}"
  say "in-image check ($kind): the CA bundle mounted at build time did not stay in the image"
  local base_ctr in_base in_image
  base_ctr=$($BUILDAH from --pull=never "$BASE")
  in_base=$($BUILDAH run --isolation chroot "$base_ctr" -- sha256sum /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1)
  $BUILDAH rm "$base_ctr" >/dev/null
  in_image=$($BUILDAH run --isolation chroot "$ctr" -- sha256sum /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1)
  [ "$in_image" = "$in_base" ] || die "the image's CA bundle differs from the base's (Debian's): the build-time mount leaked"
  echo "CA bundle in the image = the base's Debian bundle ($in_image); the machine's: $(sha256sum "$CA_BUNDLE" | cut -d' ' -f1)"
  say "in-image check ($kind) passed in $((SECONDS - started)) s"
  echo "CHECK_RESULT kind=$kind seconds=$((SECONDS - started)) passed"
}

kinds=$KIND; [ "$KIND" = all ] && kinds="cpu cuda"
[ $CHECK_ONLY = 1 ] || base
for kind in $kinds; do
  [ $CHECK_ONLY = 1 ] || build "$kind"
  check "$kind"
done
if [ $CLEAN = 1 ]; then
  say "removing the images and the build cache (--clean)"
  for kind in $kinds; do $BUILDAH rmi "$IMAGE_REPOSITORY:$IMAGE_TAG-$kind" || true; done
  $BUILDAH rmi --prune || true
fi
say "done; log $LOG"
