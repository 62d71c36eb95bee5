/*
 * boot_gdt: checks the descriptor tables kiln sets up for the 64-bit entry.
 *
 * The GDT in guest memory must still hold a present descriptor for each
 * selector the monitor loaded (0x10 code, 0x18 data, 0x20 TSS) and for the
 * PVH code selector 0x28, and the boot IDT must not overlap the GDT (a
 * guest that reloads a selector reads the in-memory descriptor). Reports 0
 * when all hold, 10 + slot for a missing descriptor, 20 for the overlap.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$0xd0000000, %r15d
	sgdt	gdtr(%rip)
	sidt	idtr(%rip)
	mov	gdtr + 2(%rip), %rsi	/* GDT base */

	mov	$2, %ecx		/* slots 2..5 */
1:	mov	(%rsi, %rcx, 8), %rax
	bt	$47, %rax		/* present bit */
	jnc	missing
	inc	%ecx
	cmp	$6, %ecx
	jb	1b

	/* Overlap: idt.base <= gdt.base + gdt.limit && gdt.base <= idt.base + idt.limit */
	mov	$20, %edx
	movzwl	gdtr(%rip), %eax
	add	%rsi, %rax		/* last GDT byte */
	mov	idtr + 2(%rip), %rdi
	cmp	%rax, %rdi
	ja	ok
	movzwl	idtr(%rip), %eax
	add	%rdi, %rax		/* last IDT byte */
	cmp	%rax, %rsi
	jbe	report
ok:	xor	%edx, %edx
	jmp	report
missing:
	lea	10(%rcx), %edx
report:
	mov	%edx, 8(%r15)
2:	hlt
	jmp	2b

	.balign	8
gdtr:	.word	0
	.quad	0
idtr:	.word	0
	.quad	0
