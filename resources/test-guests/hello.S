/*
 * hello: serial output over port I/O, exit status over MMIO.
 *
 * Writes MSG to the UART's transmit register (port 0x3f8) with one `outb`
 * per byte, then reports exit status 42 through the control page's exit
 * register. Port exits: exactly len(MSG); MMIO exits: exactly 1.
 */
	.code64
	.text
	.globl	_start
_start:
	lea	msg(%rip), %rsi
	mov	$msg_len, %ecx
	mov	$0x3f8, %dx
1:	lodsb
	outb	%al, %dx
	loop	1b

	mov	$0xd0000000, %edi	/* control page (a register: disp32 would sign-extend) */
	movl	$42, 8(%rdi)		/* exit report: kind 0, code 42 */
2:	hlt
	jmp	2b

msg:	.ascii	"hello from a tiny kiln guest\n"
	.equ	msg_len, . - msg
