#!/usr/bin/env bash
# Prepares a Debian machine for kiln: installs the packages the guest kernel
# build and the tests need (when missing), builds the guest kernel (cached by
# the hash of its inputs, so a second run costs nothing) and a busybox root,
# and links them under target/guest/ for the README commands and the tests;
# installs virtiofsd (`kiln run --share`), cached the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  linux-source-6.1 build-essential bc bison flex libelf-dev   # guest kernel build
  busybox-static cpio                                          # guest root file system
  e2fsprogs iproute2 util-linux                                # disk and network tests
  qemu-system-x86                                              # benchmarks: QEMU microvm side by side
  strace                                                       # benchmarks: syscalls per exit / at start-up
  libseccomp-dev libcap-ng-dev                                 # virtiofsd build (--share)
  podman runc containerd                                       # OCI runtime tests (tests/oci.rs): engines, runc baseline
  docker.io                                                    # Docker with kiln-oci as a runtime (tests/oci_docker.rs starts its own dockerd)
  containernetworking-plugins iptables                         # podman's default network (CNI bridge, -p port mapping)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No service may start while installing: docker.io's and containerd's
  # postinst scripts start their daemons through /etc/init.d where there is
  # no systemd, and a system dockerd rewrites the host's iptables and adds
  # a bridge. policy-rc.d exiting 101 tells invoke-rc.d "not allowed"; one
  # the machine already has is left as it is.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# kiln resources/setup.sh: no services start during its apt-get install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  if [ -n "$own_policy" ]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi

mkdir -p target/guest
out=$(resources/guest/build-kernel.sh)
vmlinux=$(printf '%s\n' "$out" | sed -n 's/^vmlinux=//p' | tail -n 1)
bzimage=$(printf '%s\n' "$out" | sed -n 's/^bzimage=//p' | tail -n 1)
ln -sfn "$vmlinux" target/guest/vmlinux
ln -sfn "$bzimage" target/guest/bzImage
resources/guest/build-rootfs.sh target/guest/rootfs >&2
virtiofsd=$(resources/install-virtiofsd.sh | sed -n 's/^virtiofsd=//p')
echo "setup: guest kernel target/guest/vmlinux (and bzImage), root target/guest/rootfs, virtiofsd $virtiofsd" >&2
