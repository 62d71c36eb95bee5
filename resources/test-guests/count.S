/*
 * count: a guest to pause, snapshot and restore while it makes exits
 * (tests/snapshot.rs).
 *
 * With interrupts off, installs an IDT at 0x1000 (every vector ->
 * `unexpected`, which reports 99; vector 0x20 -> `irq0`), initialises both
 * 8259s (vectors 0x20/0x28, only IRQ0 unmasked) and arms the PIT (channel
 * 0, mode 0, 100 ticks). It polls the master PIC's IRR until IRQ0 is
 * pending (97 if it never is), then turns the PIT off (mode 5: KVM arms no
 * timer for it, so a restored PIT cannot fire again). The interrupt stays
 * pending: it can only arrive once the guest enables interrupts.
 * Prints "pending\n", then the lines "0\n", "1\n", ... (per byte: one
 * `inb` of the UART's line status, then one `outb`) and reads the line
 * status once more after each line. Once a byte has
 * arrived on the UART (it is never read), prints "end\n", runs 10000 loop
 * iterations with interrupts on and reports 10 + the number of IRQ0
 * interrupts taken: 11 when the pending interrupt arrived exactly once.
 */
#include "idt_pic.inc"

	.equ	TICKS, 0x3000		/* IRQ0 interrupts taken */
	.equ	COM1, 0x3f8

	.code64
	.text
	.globl	_start
_start:
	cli
	mov	$0xd0000000, %r15d	/* control page, for every exit report */
	movl	$0, TICKS

	install_idt unexpected, 0x20, irq0

	init_pics 0xfe		/* only IRQ0 unmasked */

	/* PIT channel 0: lobyte/hibyte, mode 0 (one interrupt), 100 ticks. */
	mov	$0x30, %al
	outb	%al, $0x43
	mov	$100, %al
	outb	%al, $0x40
	xor	%al, %al
	outb	%al, $0x40

	/* Wait for IRQ0 in the master's IRR (OCW3 0x0a selects it). */
	mov	$1000000, %ecx
1:	mov	$0x0a, %al
	outb	%al, $0x20
	inb	$0x20, %al
	test	$1, %al
	jnz	2f
	loop	1b
	movl	$97, 8(%r15)
	jmp	halt

	/* PIT off: channel 0 in mode 5, reloaded. */
2:	mov	$0x3a, %al
	outb	%al, $0x43
	mov	$0xff, %al
	outb	%al, $0x40
	outb	%al, $0x40

	lea	pending(%rip), %rsi
	mov	$pending_len, %ecx
	call	print

	xor	%ebx, %ebx		/* the line number */
line:	mov	%ebx, %eax
	call	print_decimal
	mov	$'\n', %al
	call	putc
	inc	%ebx
	mov	$COM1 + 5, %dx		/* line status: bit 0 = a byte arrived */
	inb	%dx, %al
	test	$1, %al
	jz	line

	lea	end(%rip), %rsi
	mov	$end_len, %ecx
	call	print
	sti
	mov	$10000, %ecx
1:	loop	1b
	cli
	mov	TICKS, %eax
	add	$10, %eax
	mov	%eax, 8(%r15)		/* exit report */
halt:	hlt
	jmp	halt

irq0:
	incl	TICKS
	push	%rax
	mov	$0x20, %al		/* non-specific EOI */
	outb	%al, $0x20
	pop	%rax
	iretq

unexpected:
	movl	$99, 8(%r15)
	jmp	halt

/* Prints al once the UART can take it (line status bit 5, which it
 * always sets: one port read and one port write per byte, as a driver
 * makes). Clobbers ah, dx. */
putc:
	mov	%al, %ah
	mov	$COM1 + 5, %dx
1:	inb	%dx, %al
	test	$0x20, %al
	jz	1b
	mov	%ah, %al
	mov	$COM1, %dx
	outb	%al, %dx
	ret

/* Prints ecx bytes from rsi. */
print:
1:	lodsb
	call	putc
	loop	1b
	ret

/* Prints eax in decimal. Clobbers eax, ecx, edx, esi. */
print_decimal:
	mov	$10, %ecx
	xor	%esi, %esi
1:	xor	%edx, %edx
	div	%ecx
	add	$'0', %dl
	push	%rdx
	inc	%esi
	test	%eax, %eax
	jnz	1b
2:	pop	%rax
	call	putc
	dec	%esi
	jnz	2b
	ret

	idt_helpers

pending: .ascii	"pending\n"
	.equ	pending_len, . - pending
end:	.ascii	"end\n"
	.equ	end_len, . - end
