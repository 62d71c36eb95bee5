/*
 * triple_fault: loads an IDT with limit 0, then executes `ud2`. The #UD
 * vector lies beyond the limit (#GP), so does #GP's (#DF), so does #DF's:
 * the CPU shuts down (KVM_EXIT_SHUTDOWN). `ud2` rather than `int3`: the
 * PVM host's emulator cannot execute `int3` in guest kernel mode.
 */
	.code64
	.text
	.globl	_start
_start:
	lidt	null_idt(%rip)
	ud2
1:	hlt
	jmp	1b

	.balign	8
null_idt:
	.word	0
	.quad	0
