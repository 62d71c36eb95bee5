/*
 * mmio_exec: jumps to 0xe0000000, an address with no RAM and no device
 * behind it. Fetching an instruction there is an MMIO access that KVM's
 * instruction emulator cannot serve (it fetches only from guest memory),
 * so KVM_RUN returns KVM_EXIT_INTERNAL_ERROR (emulation failure) on any
 * KVM: hardware or PVM. kiln reports that as status 123.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$0xe0000000, %eax
	jmp	*%rax
