/*
 * pvh: one ELF, two entry points.
 *
 * The Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY) names `pvh_start`, 32-bit
 * protected-mode code: it checks what the PVH boot ABI promises (paging off,
 * flat 32-bit CS, EBX pointing at an hvm_start_info with its magic), prints
 * "PVH entry\n" and reports exit status 32. e_entry is `_start`, 64-bit code
 * that prints "64-bit entry\n" and reports 64: a monitor told not to use PVH
 * enters there.
 *
 * Failure codes (PVH path): 1 = paging on, 2 = CS is not selector 0x28,
 * 3 = EBX does not point at the start-info magic. (That CS is a 32-bit code
 * segment is proven by this code running correctly at all.)
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
	mov	$0xd0000000, %edi
	mov	%cr0, %eax
	mov	$1, %edx
	test	$0x80000000, %eax	/* CR0.PG must be clear */
	jnz	pvh_fail
	mov	%cs, %ax
	mov	$2, %edx
	cmp	$0x28, %ax
	jne	pvh_fail
	mov	$3, %edx
	cmpl	$0x336ec578, (%ebx)	/* XEN_HVM_START_MAGIC_VALUE */
	jne	pvh_fail

	mov	$pvh_msg, %esi
	mov	$pvh_msg_len, %ecx
	mov	$0x3f8, %dx
1:	lodsb
	outb	%al, %dx
	loop	1b
	mov	$32, %edx
pvh_fail:
	mov	%edx, 8(%edi)		/* exit report */
2:	hlt
	jmp	2b

pvh_msg:
	.ascii	"PVH entry\n"
	.equ	pvh_msg_len, . - pvh_msg

	.code64
	.globl	_start
_start:
	lea	msg64(%rip), %rsi
	mov	$msg64_len, %ecx
	mov	$0x3f8, %dx
1:	lodsb
	outb	%al, %dx
	loop	1b
	mov	$0xd0000000, %edi
	movl	$64, 8(%rdi)
2:	hlt
	jmp	2b

msg64:	.ascii	"64-bit entry\n"
	.equ	msg64_len, . - msg64
