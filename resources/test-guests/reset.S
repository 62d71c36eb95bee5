/*
 * reset: prints a line on the UART, then asks the i8042 keyboard controller
 * for a CPU reset (command 0xfe on port 0x64), the way Linux reboots with
 * `reboot=k`. Nothing is reported on the control page, so the VM ends as a
 * guest reset: a guest with its own init, as kiln sees it.
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

msg:	.ascii	"own init says bye\n"
	.equ	msg_len, . - msg
