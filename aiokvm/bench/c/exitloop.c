/*
 * exitloop.c: the C baseline VMM for benchmarks/exits.py.
 *
 * The smallest VMM that boots an aiokvm guest-kit ELF by PVH exactly as
 * aiokvm does (same irqchip, PIT, memory layout, CPUID, entry state) and
 * handles every exit inline in C: serial output to stdout, LSR reads say
 * "transmitter empty", debug-exit ends the run, everything else is counted
 * and dropped (reads return all-ones).  Its per-exit cost is the floor any
 * user-mode VMM on this host pays.
 *
 *   exitloop GUEST.elf [CMDLINE] [MEMORY_MIB]
 *
 * Exit status: the guest's debug-exit value.  On stderr: "exits N io N mmio N".
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define START_INFO 0x6000
#define MEMMAP 0x6040
#define CMDLINE 0x20000

static void die(const char *what)
{
	fprintf(stderr, "exitloop: %s: %s\n", what, strerror(errno));
	exit(125);
}

static void xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	if (ioctl(fd, req, arg) < 0)
		die(what);
}

static uint32_t load_elf(const char *path, uint8_t *ram, size_t ram_size)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	uint8_t *img;
	Elf64_Ehdr *eh;
	uint32_t entry = 0;

	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (img == MAP_FAILED)
		die("mmap image");
	eh = (Elf64_Ehdr *)img;
	for (int i = 0; i < eh->e_phnum; i++) {
		Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
		if (ph->p_type == PT_LOAD) {
			if (ph->p_paddr + ph->p_memsz > ram_size) {
				fprintf(stderr, "exitloop: segment outside RAM\n");
				exit(125);
			}
			memcpy(ram + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
			memset(ram + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
		} else if (ph->p_type == PT_NOTE) {
			size_t off = 0;
			while (off + 12 <= ph->p_filesz) {
				uint32_t *n = (uint32_t *)(img + ph->p_offset + off);
				size_t desc = off + 12 + ((n[0] + 3) & ~3u);
				if (n[2] == 18 && n[0] == 4 && !memcmp(n + 3, "Xen", 4))
					entry = *(uint32_t *)(img + ph->p_offset + desc);
				off = desc + ((n[1] + 3) & ~3u);
			}
		}
	}
	if (!entry) {
		fprintf(stderr, "exitloop: no PVH note\n");
		exit(125);
	}
	munmap(img, st.st_size);
	close(fd);
	return entry;
}

static void put_e820(uint8_t *ram, int i, uint64_t addr, uint64_t size, uint32_t type)
{
	uint8_t *e = ram + MEMMAP + i * 24;
	memcpy(e, &addr, 8);
	memcpy(e + 8, &size, 8);
	memcpy(e + 16, &type, 4);
	memset(e + 20, 0, 4);
}

static void write_start_info(uint8_t *ram, size_t ram_size, const char *cmdline)
{
	uint32_t info[14] = {0};
	uint64_t v;

	strcpy((char *)ram + CMDLINE, cmdline);
	/* The same map aiokvm gives (QEMU microvm's). */
	put_e820(ram, 0, 0, 0x9fc00, 1);
	put_e820(ram, 1, 0x9fc00, 0x400, 2);
	put_e820(ram, 2, 0xf0000, 0x10000, 2);
	put_e820(ram, 3, 0x100000, ram_size - 0x100000, 1);
	put_e820(ram, 4, 0xfeffc000, 0x4000, 2);
	info[0] = 0x336ec578;
	info[1] = 1;
	v = CMDLINE;
	memcpy(&info[6], &v, 8);
	v = MEMMAP;
	memcpy(&info[10], &v, 8);
	info[12] = 5;
	memcpy(ram + START_INFO, info, sizeof(info));
}

static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->db = 1;
	s->s = 1;
	s->g = 1;
	(void)code;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "exitloop.elf";
	const char *cmdline = argc > 2 ? argv[2] : "";
	size_t ram_size = (size_t)(argc > 3 ? atoi(argv[3]) : 64) << 20;
	int kvm, vm, vcpu, mmap_size, code = -1;
	uint8_t *ram;
	struct kvm_run *run;
	unsigned long exits = 0, io = 0, mmio = 0;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &(uint64_t){0xfeffc000});
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfeffd000UL);
	xioctl(vm, KVM_CREATE_IRQCHIP, NULL, "KVM_CREATE_IRQCHIP");
	struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
	xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

	ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap RAM");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = ram_size, .userspace_addr = (uint64_t)ram,
	};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = 256;
	xioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID");
	for (unsigned i = 0; i < cpuid->nent; i++)
		if (cpuid->entries[i].function == 1)
			cpuid->entries[i].ebx = (cpuid->entries[i].ebx & 0xffff) | (1 << 16);
	xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");

	uint32_t entry = load_elf(path, ram, ram_size);
	write_start_info(ram, ram_size, cmdline);

	struct kvm_sregs sregs;
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	set_seg(&sregs.cs, 0x08, 0xb, 1);
	set_seg(&sregs.ds, 0x10, 0x3, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.limit = 0x67;
	sregs.tr.selector = 0x18;
	sregs.tr.type = 0xb;
	sregs.tr.present = 1;
	sregs.cr0 = 0x11;
	sregs.cr3 = sregs.cr4 = sregs.efer = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	struct kvm_regs regs = {.rip = entry, .rbx = START_INFO, .rflags = 2};
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	while (code < 0) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			io++;
			if (run->io.direction == KVM_EXIT_IO_OUT) {
				if (run->io.port == 0xf4)
					code = data[0];
				else if (run->io.port == 0x3f8)
					fwrite(data, 1, run->io.count, stdout);
			} else {
				uint8_t fill = run->io.port == 0x3fd ? 0x60 : 0xff;
				memset(data, fill, run->io.size * run->io.count);
			}
			break;
		}
		case KVM_EXIT_MMIO:
			mmio++;
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
			break;
		case KVM_EXIT_SHUTDOWN:
			fprintf(stderr, "exitloop: triple fault\n");
			return 126;
		default:
			fprintf(stderr, "exitloop: unhandled exit %u\n", run->exit_reason);
			return 126;
		}
	}
	fflush(stdout);
	fprintf(stderr, "exits %lu io %lu mmio %lu\n", exits, io, mmio);
	return code;
}
