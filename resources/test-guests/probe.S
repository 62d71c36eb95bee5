/*
 * probe: reads that must not disturb the VM.
 *
 * 1. The control page's magic register (offset 0) reads "kiln".
 * 2. Reads of an unclaimed port (0x1234; 1, 2 and 4 bytes) and of an
 *    unclaimed MMIO address (0xe0000000; 4 and 8 bytes) return all ones;
 *    a write to each is dropped. That is 7 unclaimed accesses in total.
 * 3. The magic still reads "kiln" afterwards: the VM carried on.
 * Then it reports exit status 100. A failed check reports its own code:
 * 1 magic, 2 inb, 3 inw, 4 inl, 5 4-byte MMIO read, 6 8-byte MMIO read,
 * 7 magic after the unclaimed accesses.
 */
	.code64
	.text
	.globl	_start
_start:
	mov	$0xd0000000, %edi	/* control page */
	mov	$1, %ebx
	cmpl	$0x6e6c696b, (%rdi)	/* "kiln", little-endian */
	jne	report

	mov	$0x1234, %dx		/* no device there */
	mov	$2, %ebx
	xor	%eax, %eax
	inb	%dx, %al
	cmp	$0xff, %al
	jne	report
	mov	$3, %ebx
	xor	%eax, %eax
	inw	%dx, %ax
	cmp	$0xffff, %ax
	jne	report
	mov	$4, %ebx
	xor	%eax, %eax
	inl	%dx, %eax
	cmp	$0xffffffff, %eax
	jne	report
	outb	%al, %dx		/* dropped */

	mov	$0xe0000000, %esi	/* unclaimed MMIO (no device, no RAM) */
	mov	$5, %ebx
	xor	%eax, %eax
	movl	(%rsi), %eax
	cmp	$0xffffffff, %eax
	jne	report
	mov	$6, %ebx
	xor	%eax, %eax
	movq	(%rsi), %rax
	cmp	$-1, %rax
	jne	report
	movl	$0x12345678, (%rsi)	/* dropped */

	mov	$7, %ebx
	cmpl	$0x6e6c696b, (%rdi)
	jne	report
	mov	$100, %ebx
report:
	mov	%ebx, 8(%rdi)		/* exit report: kind 0, code in bl */
1:	hlt
	jmp	1b
