/*
 * exit_loop: exit-cost benchmark.
 *
 * Does P `outb` writes to port 0x80 (kiln's no-op debug port), then M
 * 4-byte MMIO writes to the control page's scratch register (offset 0xc),
 * then reports exit status 0. P and M come from the kernel command line
 * words `exit_loop.pio=P` and `exit_loop.mmio=M` (decimal; kiln run
 * --cmdline), each 100000 when absent. Exits to the monitor: exactly P port
 * writes and M + 1 MMIO writes.
 */
	.equ	DEFAULT_COUNT, 100000

	.code64
	.text
	.globl	_start
_start:
	mov	0x228(%rsi), %r12d	/* zero page (rsi): hdr.cmd_line_ptr */
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
3:	movl	%ecx, 0xc(%rdi)		/* scratch register */
	dec	%ecx
	jnz	3b

4:	movl	$0, 8(%rdi)		/* exit report: status 0 */
5:	hlt
	jmp	5b

/*
 * eax = decimal value after the NUL-terminated key at r13 (which ends in
 * '=') in the NUL-terminated command line at r12, if a word starts with
 * the key; DEFAULT_COUNT otherwise.
 */
param:
	mov	%r12, %rsi
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
found:	xor	%eax, %eax
digit:	movzbl	(%rsi), %ecx
	sub	$'0', %ecx
	cmp	$9, %ecx
	ja	done
	imul	$10, %eax, %eax
	add	%ecx, %eax
	inc	%rsi
	jmp	digit
done:	ret
absent:	mov	$DEFAULT_COUNT, %eax
	ret

key_pio:	.asciz	"exit_loop.pio="
key_mmio:	.asciz	"exit_loop.mmio="
