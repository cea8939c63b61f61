#!/usr/bin/env bash
# Shared by ci/crash-test and ci/handshake-kill (sourced, not run): a QEMU guest that writes
# and fsyncs files on an ext4 disk served over vhost-user until the host tells it to stop, the
# two backends that can serve that disk (vloop-blk, qemu-storage-daemon), and the checks run on
# the image afterwards.
#
# The guest reports on its second serial port, which QEMU serves as a unix socket; the host
# end is ci/lib/guest_channel.py, which writes the guest's lines to $work/PREFIX.out and sends
# `STOP` on SIGUSR1. Lines: `VLOOP-START PREFIX`; `VLOOP-WRITING NAME SHA256` when a new
# content of NAME is fsynced under a temporary name, `VLOOP-DURABLE NAME SHA256` once it is
# renamed to NAME and the directory is fsynced; `VLOOP-DONE PREFIX N` after a clean unmount;
# `VLOOP-FATAL WHAT` on an error. The guest cycles through a fixed set of names (the
# `vloop.slots` kernel argument) so that the disk never fills however long it runs: the
# image is checked against the last content reported durable under each name.
#
# The sourcing script sets: work (a scratch directory), FILE_KIB, TIMEOUT (seconds a guest may
# run), HANG (seconds without a new fsynced file that count as a hung guest), and a `die`
# function; it may set QEMU and QSD (the binaries; defaults from PATH), VLOOP (the vloop-blk
# binary), backend_log (the current backend's log) and events (a log of the test's own steps),
# which failure messages show the end of.
# shellcheck disable=SC2154 # work, FILE_KIB, TIMEOUT, HANG, VLOOP come from the sourcing script.

QEMU=${QEMU:-qemu-system-x86_64}
QSD=${QSD:-qemu-storage-daemon}
guest_lib=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# guest_need_tools TOOL...: every tool is on PATH (or is an executable path). A missing one
# fails the test under CI=true and skips it otherwise (`SKIPPED: reason`, exit 0).
guest_need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null && continue
        if [[ ${CI:-} = true ]]; then die "$tool not found (ci/setup installs it)"; fi
        echo "SKIPPED: $tool not found (ci/setup installs it)"
        exit 0
    done
}

# guest_kernel: sets kernel and mods to Debian's cloud kernel and its module tree, fetched into
# ~/.cache/vloop/kernels the way vloop-harness caches it.
guest_kernel() {
    local pkg kroot
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)
    [[ -n $pkg ]] || die "apt-cache knows no linux-image-cloud-amd64 (run apt-get update)"
    kroot="${XDG_CACHE_HOME:-$HOME/.cache}/vloop/kernels/$pkg"
    if [[ ! -e $kroot/.complete ]]; then
        echo "fetching $pkg into $kroot" >&2
        rm -rf "$kroot" "$kroot.download" "$kroot.unpack"
        mkdir -p "$kroot.download" "$kroot.unpack"
        (cd "$kroot.download" && apt-get download -q "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
        dpkg-deb -x "$kroot.download"/*.deb "$kroot.unpack"
        mv "$kroot.unpack" "$kroot"
        rm -rf "$kroot.download"
        touch "$kroot/.complete"
    fi
    kernel=$(find "$kroot/boot" -name 'vmlinuz-*' | head -n1)
    mods=$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
    [[ -n $kernel && -n $mods ]] || die "no kernel or modules in $kroot (remove it to fetch again)"
}

# guest_initramfs: builds $work/initrd.gz (busybox, the virtio modules and the writing guest)
# and sets initrd to it.
guest_initramfs() {
    local root="$work/initramfs" m f
    busybox --list | grep -x cpio >/dev/null || die "busybox has no cpio applet"
    mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
        f=$(find "$mods" -name "$m.ko" | head -n1)
        # Built into the kernel when there is no module file.
        if [[ -n $f ]]; then cp "$f" "$root/lib/modules/"; echo "$m" >>"$root/lib/modules/order"; fi
    done
    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
# A blocked writer shows on the console well before the host gives up on the guest.
echo 10 >/proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
arg() { sed -n "s/.*vloop\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
# The control channel: raw, so nothing is echoed and lines end with LF alone.
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
say() { echo "$*" >&3; }
# The host's `STOP` line ends the write loop.
(while read -r line <&3; do [ "$line" = STOP ] && : >/tmp/stop; done) &
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /mnt || { say "VLOOP-FATAL mount"; poweroff -f; }
prefix=$(arg prefix); kib=$(arg kib); slots=$(arg slots)
say "VLOOP-START $prefix"
# Each file is written to a temporary name and fsynced, then renamed over its name and the
# directory fsynced: a name always holds its last reported content or the one being written.
i=0
while [ ! -e /tmp/stop ]; do
    name=$prefix$((i % slots))
    f=/mnt/$name
    head -c $((kib * 1024)) /dev/urandom >"$f.tmp" || { say "VLOOP-FATAL write $f"; poweroff -f; }
    sync "$f.tmp" || { say "VLOOP-FATAL fsync $f.tmp"; poweroff -f; }
    sum=$(sha256sum "$f.tmp" | cut -d' ' -f1)
    say "VLOOP-WRITING $name $sum"
    mv "$f.tmp" "$f" && sync /mnt || { say "VLOOP-FATAL rename $f"; poweroff -f; }
    say "VLOOP-DURABLE $name $sum"
    i=$((i + 1))
done
umount /mnt || { say "VLOOP-FATAL umount"; poweroff -f; }
say "VLOOP-DONE $prefix $i"
poweroff -f
EOF
    chmod +x "$root/init"
    (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")
    initrd="$work/initrd.gz"
}

# guest_slots: how many names a guest cycles through: 96 MiB of files, so that three guests
# fit on the image.
guest_slots() {
    local n=$(( 98304 / FILE_KIB ))
    if (( n < 16 )); then n=16; fi
    echo "$n"
}

# guest_image: a fresh 512 MiB ext4 image (sparse) at $work/disk.img; with FORMAT=qcow2, that
# image is the read-only base of a qcow2 overlay at $work/disk.qcow2, which the guest writes.
guest_image() {
    image="$work/disk.img"
    rm -f "$image" "$work/disk.qcow2"
    truncate -s 512M "$image"
    mkfs.ext4 -q -F "$image"
    if [[ ${FORMAT:-raw} = qcow2 ]]; then
        qemu-img create -q -f qcow2 -F raw -b disk.img "$work/disk.qcow2"
        image="$work/disk.qcow2"
    fi
}

# flat_image: sets flat to the path of a raw view of $image for debugfs and e2fsck (for a
# qcow2 overlay, a fresh `qemu-img convert` of it, after `qemu-img check` found it free of
# corruption). The backend may still serve the image (its guest has finished and flushed):
# qemu-img reads it with -U, as debugfs reads a raw image.
flat_image() {
    flat=$image
    if [[ ${FORMAT:-raw} != qcow2 ]]; then
        return
    fi
    local rc=0
    qemu-img check -U "$image" >"$work/qcheck.log" 2>&1 || rc=$?
    # 0: clean; 3: leaked clusters only, which a crash may leave (as in QEMU).
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        die "qemu-img check found corruption in the overlay (exit $rc): $(tail -n5 "$work/qcheck.log")"
    fi
    rm -f "$work/flat.raw"
    qemu-img convert -U -f qcow2 -O raw "$image" "$work/flat.raw" || die "qemu-img convert of the overlay failed"
    flat="$work/flat.raw"
}

# backend_start KIND SOCKET LOG: starts vloop-blk (KIND vloop, binary $VLOOP) or
# qemu-storage-daemon (KIND qsd) serving $image on SOCKET, logging to LOG; sets backend_pid.
# Returns once the socket listens. A backend that exits because the image is still locked (a
# killed predecessor's lock lives until the kernel has finished its in-flight I/O) is started
# again, as a supervisor would, for up to 10 s; lock_retries counts these restarts and
# lock_wait_max_ms is the longest time such a start took.
lock_retries=0
lock_wait_max_ms=0
backend_start() {
    local kind=$1 sock=$2 log=$3 t0 waited tries=0 _
    t0=$(now_us)
    while true; do
        rm -f "$sock"
        case $kind in
        vloop)
            "$VLOOP" --socket-path "$sock" --blk-file "$image" >>"$log" 2>&1 &
            ;;
        qsd)
            local node=(--blockdev "driver=file,node-name=disk0,filename=$image")
            if [[ ${FORMAT:-raw} = qcow2 ]]; then
                node=(--blockdev "driver=file,node-name=file0,filename=$image"
                    --blockdev "driver=qcow2,node-name=disk0,file=file0")
            fi
            "$QSD" "${node[@]}" \
                --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path="$sock",writable=on \
                >>"$log" 2>&1 &
            ;;
        *) die "unknown backend $kind (vloop or qsd)" ;;
        esac
        backend_pid=$!
        for _ in $(seq 400); do
            if [[ -S $sock ]]; then
                waited=$(( ($(now_us) - t0) / 1000 ))
                if (( tries > 0 && waited > lock_wait_max_ms )); then lock_wait_max_ms=$waited; fi
                return 0
            fi
            kill -0 "$backend_pid" 2>/dev/null || break
            sleep 0.01
        done
        wait "$backend_pid" 2>/dev/null || true
        if tail -n1 "$log" | grep -qE 'in use by another process|Failed to get .* lock' &&
            (( $(now_us) - t0 < 10000000 )); then
            lock_retries=$((lock_retries + 1))
            tries=$((tries + 1))
            sleep 0.02
            continue
        fi
        die "$kind did not start: $(tail -n3 "$log")"
    done
}

# qemu_chardev_reconnect: the -chardev option that makes QEMU reconnect after 1 s
# (`reconnect-ms` from QEMU 9.2, which deprecates `reconnect`).
qemu_chardev_reconnect() {
    local v major minor
    v=$("$QEMU" --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)
    read -r major minor <<<"$v"
    if (( major > 9 || (major == 9 && minor >= 2) )); then echo reconnect-ms=1000; else echo reconnect=1; fi
}

# qemu_start PREFIX SOCKET: a guest whose files are named PREFIX<n>, its disk on SOCKET.
# Console: $work/PREFIX.console; QEMU's stderr and vhost-user trace: $work/PREFIX.qemu.log;
# the guest's report lines: $work/PREFIX.out. Sets qemu_pid and chan_pid.
qemu_start() {
    local prefix=$1 sock=$2 ctl="$work/$1.ctl"
    : >"$work/$prefix.out"
    rm -f "$ctl"
    "$QEMU" -nodefaults -display none -no-reboot -accel tcg -m 256 \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet no_timer_check vloop.prefix=$prefix vloop.kib=$FILE_KIB vloop.slots=$(guest_slots)" \
        -chardev socket,id=c0,path="$sock,$(qemu_chardev_reconnect)" \
        -device vhost-user-blk-pci,chardev=c0,num-queues=1 \
        -serial file:"$work/$prefix.console" \
        -chardev socket,id=ctl,path="$ctl",server=on,wait=on -serial chardev:ctl \
        -trace enable=vhost_user_write -trace enable=vhost_user_read \
        >"$work/$prefix.qemu.log" 2>&1 &
    qemu_pid=$!
    python3 "$guest_lib/guest_channel.py" "$ctl" "$work/$prefix.out" 60 2>>"$work/$prefix.qemu.log" &
    chan_pid=$!
    progress_n=0
    progress_t=$SECONDS
    guest_started=$SECONDS
}

# count PATTERN FILE: how many lines of FILE match PATTERN (0 without the file).
count() {
    if [[ -e $2 ]]; then grep -c -- "$1" "$2" || true; else echo 0; fi
}

# durable PREFIX: how many files the guest reported fsynced.
durable() { count "^VLOOP-DURABLE $1" "$work/$1.out"; }

# qemu_enables: how many SET_VRING_ENABLE messages (request 18) QEMU has sent the current
# backend of guest PREFIX, from QEMU's vhost_user_write trace.
qemu_enables() { count 'vhost_user_write req:18 ' "$work/$1.qemu.log"; }

# guest_tail PREFIX: the end of a guest's console, QEMU's log and the backend's log.
guest_tail() {
    echo "--- console of guest $1 (last 15 lines) ---"
    tail -n15 "$work/$1.console" 2>/dev/null
    echo "--- QEMU of guest $1 (last 8 lines without trace) ---"
    grep -v 'vhost_user_\(read\|write\)' "$work/$1.qemu.log" 2>/dev/null | tail -n8
    if [[ -n ${events:-} ]]; then
        echo "--- the test's last events ($events) ---"
        tail -n5 "$events" 2>/dev/null
    fi
    if [[ -n ${backend_log:-} ]]; then
        echo "--- backend log $backend_log (last 8 lines) ---"
        tail -n8 "$backend_log" 2>/dev/null
    fi
}

# guest_check PREFIX: fails on a guest error, an early exit, a guest running longer than
# TIMEOUT, or HANG seconds without a new fsynced file (a hung guest).
guest_check() {
    local prefix=$1 n
    if grep -q VLOOP-FATAL "$work/$prefix.out"; then
        die "guest $prefix: $(grep VLOOP-FATAL "$work/$prefix.out")
$(guest_tail "$prefix")"
    fi
    n=$(durable "$prefix")
    if (( n != progress_n )); then
        progress_n=$n
        progress_t=$SECONDS
    elif grep -q "^VLOOP-DONE $prefix" "$work/$prefix.out"; then
        :
    elif (( SECONDS - progress_t >= HANG )); then
        die "guest $prefix hung: no file fsynced for ${HANG}s (at $n files)
$(guest_tail "$prefix")"
    fi
    kill -0 "$qemu_pid" 2>/dev/null || grep -q "^VLOOP-DONE $prefix" "$work/$prefix.out" ||
        die "QEMU of guest $prefix exited early
$(guest_tail "$prefix")"
    (( SECONDS - guest_started < TIMEOUT )) ||
        die "guest $prefix still running after ${TIMEOUT}s (at $n files)
$(guest_tail "$prefix")"
}

# now_us: the wall clock in microseconds.
now_us() { echo "${EPOCHREALTIME//[.,]/}"; }

# guest_sleep PREFIX MS: sleeps MS milliseconds, watching the guest.
guest_sleep() {
    local end=$(( $(now_us) + $2 * 1000 ))
    while (( $(now_us) < end )); do
        guest_check "$1"
        sleep 0.05
    done
}

# wait_durable PREFIX N: until the guest reported N fsynced files.
wait_durable() {
    while (( $(durable "$1") < $2 )); do
        guest_check "$1"
        sleep 0.1
    done
}

# guest_finish PREFIX: tells the guest to stop, waits for its clean unmount and QEMU's exit.
guest_finish() {
    local prefix=$1
    kill -USR1 "$chan_pid" 2>/dev/null || die "the control channel of guest $prefix is gone"
    while kill -0 "$qemu_pid" 2>/dev/null; do
        guest_check "$prefix"
        sleep 0.1
    done
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    wait "$chan_pid" 2>/dev/null || true
    chan_pid=""
    grep -q "^VLOOP-DONE $prefix" "$work/$prefix.out" ||
        die "guest $prefix did not finish cleanly
$(guest_tail "$prefix")"
}

# qemu_kill: SIGKILLs the running QEMU.
qemu_kill() {
    kill -9 "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    wait "$chan_pid" 2>/dev/null || true
    chan_pid=""
}

# verify_files PREFIX...: every name these guests wrote holds, on $image (read with
# debugfs), the last content the guest reported durable under it, or the content it was
# writing when it was stopped or killed (fsynced under the temporary name, renamed or not).
# Sets checked (names checked) and lost (names holding anything else, each named on stderr).
verify_files() {
    local prefix name want pending got dump="$work/verify"
    checked=0
    lost=0
    rm -rf "$dump"
    mkdir -p "$dump"
    for prefix in "$@"; do
        awk '$1 == "VLOOP-WRITING" { pend[$2] = $3 }
             $1 == "VLOOP-DURABLE" { dur[$2] = $3; delete pend[$2] }
             END { for (n in dur) print n, dur[n], (n in pend ? pend[n] : "-") }' \
            "$work/$prefix.out"
    done >"$work/verify.want"
    while read -r name _; do echo "dump /$name $dump/$name"; done <"$work/verify.want" >"$work/verify.cmds"
    flat_image
    debugfs -f "$work/verify.cmds" "$flat" >/dev/null 2>&1 || true
    while read -r name want pending; do
        got=$(sha256sum <"$dump/$name" 2>/dev/null | cut -d' ' -f1) || got=""
        checked=$((checked + 1))
        if [[ $got != "$want" && $got != "$pending" ]]; then
            echo "LOST: $name is missing or holds neither its last fsynced content nor the one being written" >&2
            lost=$((lost + 1))
        fi
    done <"$work/verify.want"
    rm -rf "$dump"
}

# fsck_clean: `e2fsck -fn` finds nothing to fix on $image.
fsck_clean() {
    flat_image
    e2fsck -fn "$flat" >"$work/fsck.log" 2>&1 || die "e2fsck -fn found problems: $(tail -n5 "$work/fsck.log")"
}
