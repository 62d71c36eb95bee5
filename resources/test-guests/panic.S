/*
 * panic: prints a Linux-style panic line on the serial port, then resets
 * through the i8042, as a kernel booted with `panic=-1 reboot=k` does.
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
	mov	$0xfe, %al
	outb	%al, $0x64
2:	hlt
	jmp	2b

msg:	.ascii	"Kernel panic - not syncing: tiny test panic\n"
	.equ	msg_len, . - msg
