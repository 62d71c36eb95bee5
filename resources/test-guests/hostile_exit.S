/*
 * hostile_exit: misuses the control page's exit register (offset 8).
 *
 * Six malformed reports, each of which must be ignored (the VM keeps
 * running): unknown kinds 0x77 and 0xffffff, 1-, 2- and 8-byte writes, and
 * a 4-byte write at the misaligned offset 9. Then the valid report "exited
 * with 33", then two more valid reports (44, and killed by signal 9) that
 * must not replace it. Expected outcome: exited with 33.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$0xd0000000, %edi
	movl	$0x7707, 8(%rdi)	/* kind 0x77: unknown */
	movl	$0xffffffff, 8(%rdi)	/* kind 0xffffff: unknown */
	movb	$13, 8(%rdi)		/* wrong widths */
	movw	$14, 8(%rdi)
	movq	$15, 8(%rdi)
	movl	$16, 9(%rdi)		/* not a register */
	movl	$33, 8(%rdi)		/* the one that counts */
	movl	$44, 8(%rdi)
	movl	$0x109, 8(%rdi)		/* kind 1 (signal), 9 */
1:	hlt
	jmp	1b
