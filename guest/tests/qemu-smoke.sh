#!/bin/sh
# Boot every guest program under QEMU (microvm, PVH) and check exit status
# and key output lines.  Usage: tests/qemu-smoke.sh [builddir] [accel]
#   accel: kvm (default) or tcg.
B=${1:-build}
ACCEL=${2:-kvm}
if [ "$ACCEL" = tcg ]; then ACC="-accel tcg"; else ACC="-enable-kvm"; fi
QEMU="qemu-system-x86_64 $ACC -M microvm,acpi=off -cpu qemu64 -m 64M \
 -nodefaults -no-user-config -nographic -serial stdio \
 -device isa-debug-exit,iobase=0xf4,iosize=4"
fail=0

# check <name> <expected status> <expected substring> <elf> <append> [qemu args]
check() {
	name=$1 want=$2 text=$3 elf=$4 app=$5
	shift 5
	out=$(timeout 60 $QEMU "$@" -kernel "$B/$elf.elf" -append "$app" 2>/dev/null)
	rc=$?
	if [ "$rc" = "$want" ] && printf '%s\n' "$out" | grep -qF "$text"; then
		echo "PASS $name"
	else
		echo "FAIL $name (status $rc, want $want)"
		printf '%s\n' "$out" | sed 's/^/    /'
		fail=1
	fi
}

check hello            1 "Hello from aiokvm guest" hello ""
check hello-cpl3       1 "memory: "                hello "cpl=3"
check smp2             1 "all 2 cpus online"       smp "cpus=2" -smp 2
check smp2-cpl3        1 "all 2 cpus online"       smp "cpus=2 cpl=3" -smp 2
check smp-timeout      3 "smp: timeout, 1 of 2"    smp "cpus=2 timeout_ms=500"
check exitloop         1 "exitloop: done 10000"    exitloop "n=10000"
check exitloop-cpl3    1 "exitloop: done 10000"    exitloop "n=10000 cpl=3"
check exitloop-mmio    1 "exitloop: done 10000"    exitloop "n=10000 mmio=0xd0000000"
check exitloop-in      1 "exitloop: done 10000"    exitloop "n=10000 mode=in size=4"
check triplefault      0 "about to fault"          triplefault "" -no-reboot
check unclaimed        1 "inb=0xff inw=0xffff inl=0xffffffff" unclaimed ""

# Disk programs on fresh 256 KiB zero images (sectors=64): the checksum
# must be the same on every device.  QEMU's ide-hd refuses read-only
# drives, so the write-error path is checked on virtio only.
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
img() { rm -f "$T/$1.img"; truncate -s 256K "$T/$1.img"; }
VIRTIO="-global virtio-mmio.force-legacy=false -device virtio-blk-device,drive=d0"
IDE="-device isa-ide,iobase=0x1f0,iobase2=0x3f6,irq=14 -device ide-hd,drive=d1,bus=ide.0"
SUM="disktest: checksum eda06242d68d82dc"
img v
check disktest-virtio  1 "$SUM" disktest "dev=virtio sectors=64 cpl=3" \
	$VIRTIO -drive id=d0,file="$T/v.img",format=raw,if=none
img w
check disktest-ata-word 1 "$SUM" disktest "dev=ata-word sectors=64 cpl=3" \
	$IDE -drive id=d1,file="$T/w.img",format=raw,if=none
img r
check disktest-ata-rep 1 "$SUM" disktest "dev=ata-rep sectors=64 cpl=3" \
	$IDE -drive id=d1,file="$T/r.img",format=raw,if=none
img c
check disktest-cpl0    1 "$SUM" disktest "dev=virtio sectors=64" \
	$VIRTIO -drive id=d0,file="$T/c.img",format=raw,if=none
img o
check disktest-ro      7 "disktest: read-only: 8 write errors" disktest \
	"dev=virtio sectors=64 cpl=3" \
	$VIRTIO -drive id=d0,file="$T/o.img",format=raw,if=none,readonly=on
img g
check disktest-gen     1 "disktest: flushed generation 10" disktest \
	"dev=virtio gen=10 sectors=4 cpl=3" \
	$VIRTIO -drive id=d0,file="$T/g.img",format=raw,if=none
check diskbench-virtio 1 "diskbench: dev=virtio op=read pattern=rand bs=4096 qd=8 bytes=262144 ticks=" \
	diskbench "dev=virtio op=read pattern=rand bs=4096 qd=8 bytes=262144 cpl=3" \
	$VIRTIO -drive id=d0,file="$T/v.img",format=raw,if=none
check diskbench-ata    1 "diskbench: dev=ata-rep op=write pattern=seq bs=4096 qd=1 bytes=16384 ticks=" \
	diskbench "dev=ata-rep op=write bs=4096 bytes=16384 cpl=3" \
	$IDE -drive id=d1,file="$T/w.img",format=raw,if=none
# Without dev= the programs probe: virtio-blk first, then ATA (ata-rep).
img p
check disktest-probe-virtio 1 "disktest: dev=virtio capacity=512 sectors" disktest \
	"sectors=64 cpl=3" $VIRTIO -drive id=d0,file="$T/p.img",format=raw,if=none
img q
check disktest-probe-ata 1 "disktest: dev=ata-rep capacity=512 sectors" disktest \
	"sectors=64 cpl=3" $IDE -drive id=d1,file="$T/q.img",format=raw,if=none
check disktest-probe-none 5 "disktest: no disk found" disktest "cpl=3"
exit $fail
