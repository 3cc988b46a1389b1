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
exit $fail
