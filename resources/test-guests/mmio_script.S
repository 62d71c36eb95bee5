/*
 * mmio_script: runs a script of memory and MMIO accesses that the test
 * hands it as its initrd, so one guest can drive kiln's virtio-mmio
 * devices through the real transport in any way a test describes
 * (tests/hostile_guests.rs builds the scripts).
 *
 * The script is at hdr.ramdisk_image (zero page 0x218), hdr.ramdisk_size
 * bytes long (0x21c), and is a list of 24-byte records:
 *
 *	u32 op, u32 count, u64 addr, u64 val	(little-endian)
 *
 *   op  name    what it does
 *    0  END     reports exit status `val` through the control page
 *    1  W8      writes the low byte of `val` at `addr`, `count` times
 *    2  W16     the same, 2 bytes          (count 0 means once)
 *    3  W32     the same, 4 bytes
 *    4  W64     the same, 8 bytes
 *    5  R8      reads 1 byte at `addr` and prints it: 16 hex digits, '\n'
 *    6  R16     the same, 2 bytes
 *    7  R32     the same, 4 bytes
 *    8  R64     the same, 8 bytes
 *    9  WAIT16  polls the 2 bytes at `addr` until they equal `val` (with
 *               no bound: a device that never answers ends the run by
 *               the VM's timeout)
 *   10  COPY    copies `count` bytes from script offset `val` to `addr`
 *   11  FILL    sets `count` bytes at `addr` to the low byte of `val`
 *   12  PROMPT  prints "?\n", then (unless `val` is 1) waits for a byte on
 *               the UART
 *
 * Every access has exactly the width named: 1/2/8-byte MMIO accesses reach
 * the monitor as such. Exit status 97 = the script ended without END,
 * 98 = no script, 99 = an unknown op (its record is the last thing the
 * guest did). Printing is one `outb` per
 * byte to port 0x3f8.
 */
	.equ	UART, 0x3f8
	.equ	UART_LSR, 0x3fd
	.equ	CONTROL_PAGE, 0xd0000000
	.equ	REC, 24			/* bytes per record */

	.code64
	.text
	.globl	_start
_start:
	mov	0x218(%rsi), %r13d	/* hdr.ramdisk_image: script start */
	mov	0x21c(%rsi), %r14d	/* hdr.ramdisk_size */
	mov	$98, %eax
	test	%r14d, %r14d
	jz	report
	add	%r13, %r14		/* r14: script end */
	mov	%r13, %r12		/* r12: the record being run */

next:	lea	REC(%r12), %rax
	cmp	%r14, %rax		/* a record cut short ends the script */
	ja	end_of_script
	mov	(%r12), %eax		/* op */
	mov	4(%r12), %ecx		/* count */
	mov	8(%r12), %rdi		/* addr */
	mov	16(%r12), %rdx		/* val */
	add	$REC, %r12
	test	%ecx, %ecx
	jnz	1f
	inc	%ecx
1:	cmp	$12, %eax
	ja	bad_op
	jmp	*ops(,%rax,8)

	.section .rodata
	.balign	8
ops:	.quad	op_end, op_w8, op_w16, op_w32, op_w64
	.quad	op_r8, op_r16, op_r32, op_r64
	.quad	op_wait16, op_copy, op_fill, op_prompt
	.text

op_w8:	movb	%dl, (%rdi)
	dec	%ecx
	jnz	op_w8
	jmp	next
op_w16:	movw	%dx, (%rdi)
	dec	%ecx
	jnz	op_w16
	jmp	next
op_w32:	movl	%edx, (%rdi)
	dec	%ecx
	jnz	op_w32
	jmp	next
op_w64:	movq	%rdx, (%rdi)
	dec	%ecx
	jnz	op_w64
	jmp	next

op_r8:	movzbl	(%rdi), %eax
	jmp	print_rax
op_r16:	movzwl	(%rdi), %eax
	jmp	print_rax
op_r32:	movl	(%rdi), %eax
	jmp	print_rax
op_r64:	movq	(%rdi), %rax
print_rax:
	mov	$16, %ecx		/* 16 hex digits, most significant first */
1:	rol	$4, %rax
	mov	%eax, %ebx
	and	$0xf, %ebx
	movzbl	hex(%rbx), %ebx
	call	putc
	dec	%ecx
	jnz	1b
	mov	$'\n', %ebx
	call	putc
	jmp	next

op_wait16:
	cmpw	%dx, (%rdi)
	je	next
	pause
	jmp	op_wait16

op_copy:
	lea	(%r13,%rdx), %rsi	/* source: inside the script */
	rep movsb			/* rdi: destination, rcx: count */
	jmp	next

op_fill:
	mov	%edx, %eax
	rep stosb
	jmp	next

op_prompt:
	mov	%rdx, %r8		/* putc takes dx */
	mov	$'?', %ebx
	call	putc
	mov	$'\n', %ebx
	call	putc
	cmp	$1, %r8
	je	next			/* print only */
	mov	$UART_LSR, %dx
1:	mov	$1000, %ecx		/* spaces the polls out: fewer exits */
2:	dec	%ecx
	jnz	2b
	inb	%dx, %al
	test	$1, %al			/* LSR.DR: a byte has arrived */
	jz	1b
	mov	$UART, %dx
	inb	%dx, %al		/* take it */
	jmp	next

op_end:	mov	%edx, %eax
	jmp	report
end_of_script:
	mov	$97, %eax		/* no END: the script was cut short */
	jmp	report
bad_op:	mov	$99, %eax
report:	mov	$CONTROL_PAGE, %edi
	movzbl	%al, %eax
	movl	%eax, 8(%rdi)		/* exit report: status al */
1:	hlt
	jmp	1b

/* Prints the byte in bl; keeps every register but dx. */
putc:	push	%rax
	mov	%ebx, %eax
	mov	$UART, %dx
	outb	%al, %dx
	pop	%rax
	ret

	.section .rodata
hex:	.ascii	"0123456789abcdef"
