/*
 * kvm-floor: the least a monitor can do per VM exit, for comparison with kiln.
 *
 * Creates a VM with KVM_CREATE_VM, one memory slot and one vCPU in 64-bit
 * long mode (page tables, GDT and registers set from here), loads the
 * PT_LOAD segments of an ELF guest (resources/bench/guest/bench_exit.S), and
 * enters it at e_entry with RSI pointing at a zero page whose cmd_line_ptr
 * holds CMDLINE. Then it loops on KVM_RUN: a port write or an MMIO write is
 * counted and the vCPU re-entered at once, with no device model behind it;
 * the MMIO write to 0xd000_0008 (kiln's exit report) ends the run.
 *
 * No in-kernel irqchip and no PIT unless -i is given (then KVM_CREATE_IRQCHIP
 * and KVM_CREATE_PIT2, as kiln has, to show what they add per exit).
 *
 * Usage: kvm-floor [-i] GUEST.elf [CMDLINE]
 * Prints on stderr: exit counts and the time spent in the KVM_RUN loop.
 * Exit status 0 when the guest reported, 1 on any error.
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
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (32UL << 20)
#define GDT_ADDR 0x500UL
#define ZERO_PAGE 0x7000UL
#define STACK_TOP 0x8ff0UL
#define PML4_ADDR 0x9000UL
#define PDPT_ADDR 0xa000UL
#define PD_ADDR 0xb000UL /* four PDs: 0xb000-0xefff map 0-4 GiB */
#define CMDLINE_ADDR 0x20000UL
#define CMDLINE_MAX 4096
#define EXIT_REPORT 0xd0000008UL

static void die(const char *what)
{
	fprintf(stderr, "kvm-floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *msg)
{
	fprintf(stderr, "kvm-floor: %s\n", msg);
	exit(1);
}

static uint64_t load_elf(const char *path, uint8_t *mem)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	uint8_t *img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (img == MAP_FAILED)
		die("mmap guest ELF");
	close(fd);
	if ((size_t)st.st_size < sizeof(Elf64_Ehdr))
		fail("guest ELF too short");
	Elf64_Ehdr *eh = (Elf64_Ehdr *)img;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64)
		fail("guest is not a 64-bit ELF");
	if (eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size)
		fail("guest ELF program headers out of range");
	Elf64_Phdr *ph = (Elf64_Phdr *)(img + eh->e_phoff);
	for (int i = 0; i < eh->e_phnum; i++) {
		if (ph[i].p_type != PT_LOAD)
			continue;
		if (ph[i].p_paddr + ph[i].p_memsz > MEM_SIZE || ph[i].p_filesz > ph[i].p_memsz ||
		    ph[i].p_offset + ph[i].p_filesz > (uint64_t)st.st_size)
			fail("guest ELF segment out of range");
		memcpy(mem + ph[i].p_paddr, img + ph[i].p_offset, ph[i].p_filesz);
	}
	uint64_t entry = eh->e_entry;
	munmap(img, st.st_size);
	return entry;
}

/* Identity map of 0-4 GiB with 2 MiB pages; flat GDT: 0x08 code64, 0x10 data. */
static void write_boot_tables(uint8_t *mem)
{
	uint64_t *pml4 = (uint64_t *)(mem + PML4_ADDR);
	uint64_t *pdpt = (uint64_t *)(mem + PDPT_ADDR);
	uint64_t *pd = (uint64_t *)(mem + PD_ADDR);
	pml4[0] = PDPT_ADDR | 3;
	for (uint64_t i = 0; i < 4; i++)
		pdpt[i] = (PD_ADDR + i * 0x1000) | 3;
	for (uint64_t i = 0; i < 4 * 512; i++)
		pd[i] = (i << 21) | 0x83;
	uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
	gdt[0] = 0;
	gdt[1] = 0x00af9a000000ffffULL;
	gdt[2] = 0x00cf92000000ffffULL;
}

static void setup_vcpu(int kvm, int vcpu, uint64_t entry)
{
	/* Long mode needs CPUID.LM in the guest's CPUID. */
	int n = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(struct kvm_cpuid_entry2));
	if (!cpuid)
		fail("out of memory");
	cpuid->nent = n;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	free(cpuid);

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 11,
		.present = 1, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 3;
	data.l = 0;
	data.db = 1;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.gdt.base = GDT_ADDR;
	sregs.gdt.limit = 3 * 8 - 1;
	sregs.cr3 = PML4_ADDR;
	sregs.cr4 = 1 << 5;				/* PAE */
	sregs.cr0 = (1U << 0) | (1U << 4) | (1U << 31); /* PE, ET, PG */
	sregs.efer = (1 << 8) | (1 << 10);		/* LME, LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");

	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = entry;
	regs.rsi = ZERO_PAGE;
	regs.rsp = STACK_TOP;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

int main(int argc, char **argv)
{
	int irqchip = 0;
	int opt;
	while ((opt = getopt(argc, argv, "i")) != -1) {
		if (opt != 'i') {
			fprintf(stderr, "usage: kvm-floor [-i] GUEST.elf [CMDLINE]\n");
			return 1;
		}
		irqchip = 1;
	}
	if (optind >= argc || argc - optind > 2) {
		fprintf(stderr, "usage: kvm-floor [-i] GUEST.elf [CMDLINE]\n");
		return 1;
	}
	const char *guest = argv[optind];
	const char *cmdline = optind + 1 < argc ? argv[optind + 1] : "";
	if (strlen(cmdline) >= CMDLINE_MAX)
		fail("command line too long");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		fail("unexpected KVM API version");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (irqchip) {
		struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
		if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
			die("KVM_CREATE_IRQCHIP");
		if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
			die("KVM_CREATE_PIT2");
	}

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	uint64_t entry = load_elf(guest, mem);
	write_boot_tables(mem);
	*(uint32_t *)(mem + ZERO_PAGE + 0x228) = CMDLINE_ADDR;
	strcpy((char *)mem + CMDLINE_ADDR, cmdline);

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	setup_vcpu(kvm, vcpu, entry);

	/* The loop whose cost per iteration is the floor. */
	uint64_t pio = 0, mmio = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			pio++;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			mmio++;
			if (run->mmio.is_write && run->mmio.phys_addr == EXIT_REPORT)
				break;
			continue;
		}
		fprintf(stderr, "kvm-floor: unexpected exit reason %u\n", run->exit_reason);
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	fprintf(stderr, "kvm-floor: %llu PIO and %llu MMIO exits in %.6f s of KVM_RUN loop\n",
		(unsigned long long)pio, (unsigned long long)mmio, secs);
	return 0;
}
