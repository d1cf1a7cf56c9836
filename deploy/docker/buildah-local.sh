#!/bin/sh
# Build the Dockerfile with buildah where no base image can be pulled: a local Debian
# bookworm base (debootstrap, Debian's python3.11), then the image on it, then a smoke
# run as uid 10001 against a bundle directory. Needs root and the Debian packages
# buildah and debootstrap. What it showed on the development machine: README, Deploy.
#
#   sh deploy/docker/buildah-local.sh BUNDLE_DIR
set -eu
bundle=$(cd "$1" && pwd)
rootfs=${ROOTFS:-/var/tmp/guard-base-rootfs}
b="buildah --storage-driver vfs"
MAX_IMAGE_MB=560  # the size docs/operator/image.md states; measured 530 MB on 2026-12-07
base=localhost/debian-python:3.11-bookworm

if [ ! -x "$rootfs/usr/bin/python3" ]; then
	debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates \
		bookworm "$rootfs" http://deb.debian.org/debian
fi
ctr=$($b from scratch)
cp -a "$rootfs"/. "$($b mount "$ctr")"/
$b umount "$ctr"
$b config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
$b commit "$ctr" "$base"
$b rm "$ctr"

# The host's pip configuration and CA bundle, for a pip behind a proxy; --format docker keeps HEALTHCHECK.
$b bud --format docker --isolation chroot --network host \
	-v /etc/pip.conf:/etc/pip.conf:ro -v /etc/ssl/certs:/etc/ssl/certs:ro \
	--build-arg PYTHON_IMAGE="$base" -t localhost/backdoor-guard:local "$(dirname "$0")/../.."

ctr=$($b from localhost/backdoor-guard:local)
run="$b run --isolation chroot --network host --user 10001:10001 -v $bundle:/bundle:ro"
$run "$ctr" -- guard verify --bundle /bundle
if $run "$ctr" -- python -c "import torch" 2>/dev/null; then
	echo "torch is in the image" >&2
	exit 1
fi
$b rm "$ctr"

# The SBOM of what the image holds (Python distributions and Debian packages), and its size against
# the size the docs state (docs/operator/image.md): a dependency that grows the image fails here.
ctr=$($b from localhost/backdoor-guard:local)
$b run --isolation chroot -v "$(cd "$(dirname "$0")" && pwd)":/sbom:ro "$ctr" -- python /sbom/sbom.py \
	> "$(dirname "$0")/sbom.cdx.json"
$b rm "$ctr"
size=$($b images --format '{{.Size}}' localhost/backdoor-guard:local)  # e.g. "530 MB"
size_mb=$(echo "$size" | awk '{ v = $1; if ($2 == "GB") v *= 1000; if ($2 == "kB") v /= 1000; printf "%d", v }')
if [ "$size_mb" -gt "$MAX_IMAGE_MB" ]; then
	echo "the image is $size_mb MB, over its stated $MAX_IMAGE_MB MB" >&2
	exit 1
fi
echo "built localhost/backdoor-guard:local ($size_mb MB <= $MAX_IMAGE_MB MB); verified $bundle as uid 10001"
