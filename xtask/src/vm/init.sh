#!/bin/sh
# /init of the test VM (busybox sh). The console (ttyS0) carries what the tests print; the
# second serial port (ttyS1) carries one line per event for the host (xtask/src/vm/qemu.rs):
#   booted RELEASE | module NAME failed | start NAME | end NAME STATUS SECONDS [test result...] | done
# /vm/plan, written by the host, calls load_modules and run_entry. Debian's busybox sh runs its
# own applets before PATH: the host tools carried in the image are called by their paths.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# /tmp stays the initramfs' own (already in memory): a tmpfs there would hide a workspace that
# lives under /tmp, whose binaries the image carries at their host paths.
mount -t tmpfs tmpfs /run
chmod 1777 /tmp
# cgroups in the host's hybrid layout (the harness finds cgroup2 in mountinfo; a suite checks
# that a cgroup v1 directory is refused, which needs a v1 hierarchy): cgroup2 in unified/, and a
# v1 hierarchy without controllers in systemd/.
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/unified /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t bpf bpf /sys/fs/bpf
# The host's limit is in the tens of thousands; the kernel's default for init, 1024, is below
# what haproxy asks for.
ulimit -n 1048576
# The system-wide limit scales with the guest's memory (about 200,000 files in 2 GiB), below the
# record capacity test's 270,000 sockets; the host's is in the millions.
echo 1048576 > /proc/sys/fs/file-max
/sbin/ip link set lo up
hostname redirector-vm

exec 3>/dev/ttyS1
report() { echo "$*" >&3; }

# load_modules NAME...: modprobe (kmod, with the index depmod built on the host) loads each one
# with its dependencies; the kernel asks the same modprobe for the modules it needs later.
load_modules() {
    for module in "$@"; do
        /sbin/modprobe "$module" || report "module $module failed"
    done
}

# run_entry NAME SECONDS COMMAND...: runs COMMAND with its output on the console, killed after
# SECONDS, and reports its exit status and cargo's summary line.
run_entry() {
    name=$1 limit=$2
    shift 2
    report "start $name"
    started=$(date +%s)
    set -o pipefail
    timeout -s KILL "$limit" "$@" 2>&1 | tee /tmp/entry.log
    status=$?
    set +o pipefail
    summary=$(grep '^test result:' /tmp/entry.log | tail -n 1)
    report "end $name $status $(($(date +%s) - started)) $summary"
}

report "booted $(uname -r)"
cd /
. /vm/plan
report "done"
poweroff -f
