/*
 * halt: stops the CPU with interrupts off (`cli; hlt`), as a kernel does
 * when it has nothing left to do. With KVM's in-kernel irqchip the vCPU
 * then sleeps inside KVM_RUN; only a timeout can end the VM.
 */
	.code64
	.text
	.globl	_start
_start:
	cli
1:	hlt
	jmp	1b
