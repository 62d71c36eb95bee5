/*
 * cmdline: prints the kernel command line kiln handed it.
 *
 * Reads hdr.cmd_line_ptr from the zero page (RSI at entry), writes the
 * NUL-terminated line to the UART (port 0x3f8) one byte per `outb`,
 * then a newline, then reports exit status 0 through the control page.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	0x228(%rsi), %esi	/* zero page: hdr.cmd_line_ptr (32 bits) */
	mov	$0x3f8, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	mov	$'\n', %al
	outb	%al, %dx

	mov	$0xd0000000, %edi	/* control page */
	movl	$0, 8(%rdi)		/* exit report: status 0 */
3:	hlt
	jmp	3b
