#!/usr/bin/env bash
# Put the benchmark's working directory and the Docker engine's data on a journaled ext4.
#
# This machine's root filesystem is ext4 without a journal. ext4 then skips inodes freed in
# the last 1 to 6 minutes when it allocates one (`recently_deleted` in perf), scanning past
# each on every file creation. After a cleanup that freed ~10k inodes, pulling gcc:12 took
# 7.5 s instead of 1.5 s, nearly all in the kernel, for whichever tool ran next. A builder
# host has a journal; so does the filesystem this makes, in a sparse file mounted by loop.
#   BENCH_DIR  mount point, the benchmark's --workdir (default /var/tmp/hoist-bench)
#   BENCH_FS_GB  size (default: the root filesystem's free space minus 3 GB)
# Restarts dockerd with --data-root on it, then runs tests/lab/setup.sh (LAB_DEBIAN=1).
# Space freed inside goes back to the root filesystem with `fstrim $BENCH_DIR`.
set -euo pipefail
BENCH_DIR=${BENCH_DIR:-/var/tmp/hoist-bench}
img=/var/tmp/hoist-bench.ext4
here=$(cd "$(dirname "$0")" && pwd)

if ! mountpoint -q "$BENCH_DIR"; then
  free_gb=$(( $(df --output=avail -k /var/tmp | tail -1) / 1024 / 1024 ))
  size=${BENCH_FS_GB:-$(( free_gb - 3 ))}
  [ "$size" -ge 16 ] || { echo "fs.sh: only ${free_gb} GB free; the benchmarks need about 20" >&2; exit 1; }
  rm -rf "$BENCH_DIR" "$img"
  truncate -s "${size}G" "$img"
  mkfs.ext4 -q -F "$img"
  mkdir -p "$BENCH_DIR"
  mount -o loop "$img" "$BENCH_DIR"
fi

if [ "$(/usr/bin/docker info -f '{{.DockerRootDir}}' 2>/dev/null)" != "$BENCH_DIR/docker" ]; then
  if [ -f /var/run/docker.pid ]; then
    kill "$(cat /var/run/docker.pid)" || true
    for _ in $(seq 30); do [ -f /var/run/docker.pid ] || break; sleep 1; done
  fi
  DOCKER_DATA_ROOT="$BENCH_DIR/docker" LAB_DEBIAN=1 bash "$here/../tests/lab/setup.sh"
fi
echo "fs.sh: $BENCH_DIR is a journaled ext4 ($(df -h --output=size "$BENCH_DIR" | tail -1 | tr -d ' ')); dockerd keeps its data in $BENCH_DIR/docker" >&2
