/*
 * reset: asks the i8042 keyboard controller for a CPU reset (command 0xfe
 * on port 0x64), the way Linux reboots with `reboot=k`. Nothing is reported
 * on the control page, so the VM ends as a guest reset.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$0xfe, %al
	outb	%al, $0x64
1:	hlt
	jmp	1b
