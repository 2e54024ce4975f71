#!/usr/bin/env bash
# The test lab: a Docker engine (20.10, with BuildKit), an OCI registry on loopback, runc,
# qemu binfmt for arm64, and base images pushed to the registry. Idempotent.
# Adapted from the team's shared lab script; the project carries its own copy.
#   LAB   state directory (default /var/lib/hoist-lab)
#   REG   registry address (default 127.0.0.1:5000)
#   DOCKER_DATA_ROOT  dockerd's --data-root when this starts it (bench/fs.sh sets it)
#   LAB_DEBIAN=1 also debootstraps debian/python/gcc images (benchmarks need them).
#   S3    address of the S3 server (moto) for the shared cache store tests (default 127.0.0.1:9000)
#   MOTO_VENV  where moto is installed (default /opt/hoist-moto)
set -euo pipefail
LAB=${LAB:-/var/lib/hoist-lab}
REG=${REG:-127.0.0.1:5000}
S3=${S3:-127.0.0.1:9000}
MOTO_VENV=${MOTO_VENV:-/opt/hoist-moto}
MOTO_VERSION=5.2.6
mkdir -p "$LAB"
log() { echo "[lab] $*" >&2; }

# openssh-client/openssl: the ssh agent tests; iproute2/iptables: RUN's sandbox network and
# the tests' own network namespaces; util-linux: setpriv/unshare; procps: kill/pgrep;
# python3-venv: moto's venv (below); chromium/chromium-driver: the web UI's browser test
# (tests/tests/ui.rs starts chromedriver itself).
pkgs="docker.io containerd runc crun buildah skopeo docker-registry qemu-user-static binfmt-support busybox-static pigz umoci jq curl apache2-utils openssh-client openssl iproute2 iptables util-linux procps bzip2 git python3-venv chromium chromium-driver"
[ "${LAB_DEBIAN:-0}" = 1 ] && pkgs="$pkgs debootstrap"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  log "installing:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# arm64 emulation (the F flag makes it work inside containers)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register; fi

if ! /usr/bin/docker info >/dev/null 2>&1; then
  log "starting dockerd"
  setsid dockerd ${DOCKER_DATA_ROOT:+--data-root "$DOCKER_DATA_ROOT"} >"$LAB/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 1; done
  /usr/bin/docker info >/dev/null 2>&1 || { tail -20 "$LAB/dockerd.log"; exit 1; }
fi

if ! curl -fsS "http://$REG/v2/" >/dev/null 2>&1; then
  log "starting registry on $REG"
  mkdir -p "$LAB/registry"
  cat > "$LAB/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $LAB/registry}
  delete: {enabled: true}
http: {addr: $REG}
YML
  setsid docker-registry serve "$LAB/registry.yml" >"$LAB/registry.log" 2>&1 < /dev/null &
  for _ in $(seq 30); do curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && break; sleep 0.5; done
fi

# S3 on loopback for the shared cache store tests (tests/tests/fleet_s3.rs): moto's server,
# from PyPI into a venv once (about 10 s), pinned so the store hoist is tested against does
# not change under it. Only S3 and the server's own needs are installed, not every
# service's (moto[server] would be twice the time and disk). Its state is in memory: the
# tests make their own buckets.
moto_ok() { curl -fsS -m 5 "http://$S3/" 2>/dev/null | grep -q ListAllMyBucketsResult; }
if [ "$("$MOTO_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null)" != "$MOTO_VERSION" ]; then
  log "installing moto $MOTO_VERSION in $MOTO_VENV"
  rm -rf "$MOTO_VENV"
  /usr/bin/python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q --no-cache-dir "moto[s3]==$MOTO_VERSION" flask flask-cors
fi
if ! moto_ok; then
  log "starting moto (S3) on $S3"
  setsid "$MOTO_VENV/bin/moto_server" -H "${S3%:*}" -p "${S3##*:}" >"$LAB/moto.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do moto_ok && break; sleep 0.5; done
  moto_ok || { tail -20 "$LAB/moto.log"; exit 1; }
fi

have_image() { skopeo inspect --tls-verify=false "docker://$REG/$1" >/dev/null 2>&1; }

# busybox for amd64 and arm64, from Debian's busybox-static
bb_ok() { have_image library/busybox:latest && skopeo inspect --tls-verify=false --config "docker://$REG/library/busybox:latest" 2>/dev/null | grep -q lab-busybox-v2; }
if ! bb_ok; then
  log "building busybox (amd64+arm64)"
  dpkg --print-foreign-architectures | grep -q arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq busybox-static:amd64 busybox-static:arm64 >/dev/null)
  buildah manifest rm lab-busybox >/dev/null 2>&1 || true
  buildah manifest create lab-busybox >/dev/null
  for arch in amd64 arm64; do
    mkdir -p "$work/$arch/x" "$work/$arch/rootfs/bin" "$work/$arch/rootfs/tmp" "$work/$arch/rootfs/etc"
    dpkg-deb -x "$work"/busybox-static_*_"$arch".deb "$work/$arch/x"
    cp "$work/$arch/x/bin/busybox" "$work/$arch/rootfs/bin/busybox"
    for c in $(/usr/bin/busybox --list); do [ "$c" = busybox ] || ln -sf busybox "$work/$arch/rootfs/bin/$c"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$work/$arch/rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$work/$arch/rootfs/etc/group"
    chmod 1777 "$work/$arch/rootfs/tmp"
    c=$(buildah from --arch "$arch" scratch)
    buildah copy "$c" "$work/$arch/rootfs" / >/dev/null
    buildah config --label lab-busybox-v2=1 --arch "$arch" --os linux --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["sh"]' "$c"
    buildah commit --manifest lab-busybox "$c" >/dev/null
    buildah rm "$c" >/dev/null
  done
  buildah manifest push --all --tls-verify=false lab-busybox "docker://$REG/library/busybox:latest" >/dev/null
  rm -rf "$work"
fi

deb_image() { # name include-list
  local name=$1 include=$2 root="$LAB/rootfs-$1"
  have_image "library/$name" && return 0
  log "debootstrap $name"
  if [ ! -f "$LAB/$name.tar" ]; then
    rm -rf "$root"
    debootstrap --variant=minbase ${include:+--include=$include} bookworm "$root" http://deb.debian.org/debian >"$LAB/debootstrap-$name.log" 2>&1
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$LAB/$name.tar" .
    rm -rf "$root"
  fi
  c=$(buildah from scratch)
  buildah add "$c" "$LAB/$name.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["bash"]' "$c"
  buildah commit "$c" "lab-$name" >/dev/null
  buildah rm "$c" >/dev/null
  buildah push --tls-verify=false "lab-$name" "docker://$REG/library/$name" >/dev/null
}
if [ "${LAB_DEBIAN:-0}" = 1 ]; then
  deb_image debian:bookworm-slim ""
  deb_image python:3.11-slim "python3"
  deb_image gcc:12 "gcc,libc6-dev,make"
fi
log "ready: registry http://$REG, S3 (moto $MOTO_VERSION) http://$S3, docker $(/usr/bin/docker version -f '{{.Server.Version}}')"
