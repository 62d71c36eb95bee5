/*
 * rep_outs: serial output with one string instruction.
 *
 * Writes MSG to the UART with a single `rep outsb`. KVM may hand such a
 * string write to the monitor as one port exit carrying several bytes;
 * every byte must still reach the console, in order. Reports exit
 * status 0.
 */
	.code64
	.text
	.globl	_start
_start:
	lea	msg(%rip), %rsi
	mov	$msg_len, %ecx
	mov	$0x3f8, %dx
	cld
	rep outsb
	mov	$0xd0000000, %edi
	movl	$0, 8(%rdi)
1:	hlt
	jmp	1b

msg:	.ascii	"string I/O: all of these bytes must arrive\n"
	.equ	msg_len, . - msg
