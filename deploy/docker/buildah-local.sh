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
echo "built localhost/backdoor-guard:local; verified $bundle as uid 10001"
