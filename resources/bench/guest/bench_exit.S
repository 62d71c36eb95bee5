/*
 * bench_exit: the tiny guest of resources/bench/run.sh (exit cost and
 * monitor start-up). One ELF that kiln, QEMU and the raw KVM floor program
 * (kvm-floor.c) all run, so every monitor executes the same loop.
 *
 * Two entry points:
 *  - PVH (Xen note XEN_ELFNOTE_PHYS32_ENTRY, `pvh_start`): 32-bit protected
 *    mode, paging off, EBX = hvm_start_info. kiln and QEMU (-M microvm
 *    -kernel) enter here. A few instructions build page tables (0-8 MiB and
 *    the 2 MiB page holding 0xd000_0000), turn on long mode and jump to the
 *    common 64-bit code with the command line taken from
 *    hvm_start_info.cmdline_paddr.
 *  - 64-bit (`_start`, e_entry): long mode with RSI = a Linux zero page whose
 *    hdr.cmd_line_ptr (offset 0x228) points at the command line, as kiln
 *    --no-pvh and kvm-floor enter.
 *
 * The common code, with exits to the monitor in brackets:
 *  1. writes stage 1 to kiln's boot-timer register 0xd000_0004 [1 MMIO], so
 *     `kiln run` with KILN_LOG=info logs the time from monitor start to the
 *     first KVM_RUN (the difference of the two times it prints);
 *  2. P `outb` to port 0x80 [P PIO], then M 4-byte writes to 0xd000_000c
 *     [M MMIO]: the loop of test-guests/exit_loop.S; P and M come from the
 *     command-line words `exit_loop.pio=P` and `exit_loop.mmio=M` (0 when
 *     absent, unlike exit_loop.S);
 *  3. writes exit report 0 to 0xd000_0008 [1 MMIO]: kiln and kvm-floor stop
 *     here;
 *  4. writes 0 to port 0xf4 [1 PIO]: QEMU's isa-debug-exit device
 *     (-device isa-debug-exit,iobase=0xf4,iosize=4) ends QEMU with status 1;
 *  5. `hlt` forever.
 */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4			/* namesz: "Xen\0" */
	.long	4			/* descsz: a 32-bit physical address */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign	4
	.long	pvh_start
	.balign	4

	.text
	.code32
	.globl	pvh_start
pvh_start:
	cli
	mov	24(%ebx), %ebp		/* hvm_start_info.cmdline_paddr (low half) */
	mov	$stack_top, %esp

	/* Page tables (zero-filled in .data): PML4[0] -> PDPT; PDPT[0] -> PD0
	 * with four 2 MiB pages (0-8 MiB: the image and its stack); PDPT[3] ->
	 * PD3 with the 2 MiB page at 0xd000_0000 (entry 128). */
	movl	$(pdpt + 3), pml4
	movl	$(pd0 + 3), pdpt
	movl	$(pd3 + 3), pdpt + 3 * 8
	movl	$0x000083, pd0
	movl	$0x200083, pd0 + 8
	movl	$0x400083, pd0 + 16
	movl	$0x600083, pd0 + 24
	movl	$0xd0000083, pd3 + 128 * 8

	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$0x20, %eax		/* PAE */
	mov	%eax, %cr4
	mov	$0xc0000080, %ecx	/* EFER */
	rdmsr
	or	$0x100, %eax		/* LME */
	wrmsr
	lgdt	gdt_desc
	mov	%cr0, %eax
	or	$0x80000001, %eax	/* PG | PE */
	mov	%eax, %cr0
	ljmp	$0x08, $pvh64

	.code64
pvh64:
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%ebp, %r12d		/* command line */
	jmp	common

	.globl	_start
_start:
	mov	0x228(%rsi), %r12d	/* zero page: hdr.cmd_line_ptr */

common:
	mov	$0xd0000000, %edi
	movl	$1, 4(%rdi)		/* boot timer: stage 1 */

	lea	key_pio(%rip), %r13
	call	param
	mov	%eax, %r14d
	lea	key_mmio(%rip), %r13
	call	param
	mov	%eax, %r15d

	mov	$0x80, %dx
	mov	%r14d, %ecx
	test	%ecx, %ecx
	jz	2f
1:	outb	%al, %dx
	dec	%ecx
	jnz	1b

2:	mov	$0xd0000000, %edi
	mov	%r15d, %ecx
	test	%ecx, %ecx
	jz	4f
3:	movl	%ecx, 0xc(%rdi)		/* kiln: scratch register */
	dec	%ecx
	jnz	3b

4:	movl	$0, 8(%rdi)		/* kiln: exit report, status 0 */
	mov	$0xf4, %dx
	xor	%eax, %eax
	outl	%eax, %dx		/* QEMU: isa-debug-exit */
5:	hlt
	jmp	5b

/*
 * eax = the decimal number after the key at r13 (NUL-terminated, ending in
 * '=') in the NUL-terminated command line at r12, when a word starts with
 * the key; 0 otherwise (also when r12 is 0).
 */
param:
	xor	%eax, %eax
	mov	%r12, %rsi
	test	%rsi, %rsi
	jz	done
word:	mov	%r13, %rdi
cmp:	movb	(%rdi), %cl
	test	%cl, %cl
	jz	found
	cmpb	(%rsi), %cl
	jne	skip
	inc	%rsi
	inc	%rdi
	jmp	cmp
skip:	movb	(%rsi), %cl		/* to the start of the next word */
	test	%cl, %cl
	jz	absent
	inc	%rsi
	cmp	$' ', %cl
	jne	skip
	jmp	word
found:	movzbl	(%rsi), %ecx
	sub	$'0', %ecx
	cmp	$9, %ecx
	ja	done
	imul	$10, %eax, %eax
	add	%ecx, %eax
	inc	%rsi
	jmp	found
absent:	xor	%eax, %eax
done:	ret

key_pio:	.asciz	"exit_loop.pio="
key_mmio:	.asciz	"exit_loop.mmio="

	.balign	8
gdt:	.quad	0
	.quad	0x00af9a000000ffff	/* 0x08: 64-bit code */
	.quad	0x00cf92000000ffff	/* 0x10: data */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	gdt

	.data
	.balign	4096
pml4:	.fill	4096, 1, 0
pdpt:	.fill	4096, 1, 0
pd0:	.fill	4096, 1, 0
pd3:	.fill	4096, 1, 0
	.fill	4096, 1, 0
stack_top:
