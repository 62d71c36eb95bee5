/*
 * serial_irq: an interrupt from host input, through the 8259 PIC.
 *
 * Installs a 256-entry IDT at 0x1000 (every vector -> `unexpected`, which
 * reports 99; vector 0x24 -> `irq4`), initialises both 8259s (ICW1-4,
 * vectors 0x20/0x28, only IRQ4 unmasked), enables the UART's
 * received-data interrupt (IER bit 0), prints "ready\n" and waits with
 * `sti; hlt`. The IRQ4 handler checks the UART's IIR says "received data",
 * reads the byte, stores it at 0x3000, sends the PIC an EOI and returns with
 * `iretq`; the main loop then reports the byte as the exit status.
 * Codes other than the byte: 98 = IIR did not say "received data",
 * 99 = an unexpected vector was taken.
 * The UART is never polled: the byte arrives only if the interrupt does.
 */
#include "idt_pic.inc"

	.equ	RX, 0x3000		/* [0] = byte, [1] = 1 ok / 2 bad IIR */
	.equ	COM1, 0x3f8

	.code64
	.text
	.globl	_start
_start:
	mov	$0xd0000000, %r15d	/* control page, for every exit report */

	install_idt unexpected, 0x24, irq4

	init_pics 0xef		/* only IRQ4 unmasked */

	/* UART: 8N1, DTR|RTS|OUT2, received-data interrupt on. */
	mov	$COM1 + 3, %dx
	mov	$0x03, %al
	outb	%al, %dx
	mov	$COM1 + 4, %dx
	mov	$0x0b, %al
	outb	%al, %dx
	mov	$COM1 + 1, %dx
	mov	$0x01, %al
	outb	%al, %dx

	lea	ready(%rip), %rsi
	mov	$ready_len, %ecx
	mov	$COM1, %dx
1:	lodsb
	outb	%al, %dx
	loop	1b

wait:	sti
	hlt
	cli
	cmpb	$0, RX + 1
	je	wait
	mov	$98, %eax
	cmpb	$1, RX + 1
	jne	2f
	movzbl	RX, %eax
2:	mov	%eax, 8(%r15)		/* exit report */
3:	hlt
	jmp	3b

irq4:
	push	%rax
	push	%rdx
	mov	$COM1 + 2, %dx		/* IIR */
	inb	%dx, %al
	and	$0x0f, %al
	cmp	$0x04, %al		/* received data available */
	jne	1f
	mov	$COM1, %dx		/* RBR */
	inb	%dx, %al
	movb	%al, RX
	movb	$1, RX + 1
	jmp	2f
1:	movb	$2, RX + 1
2:	mov	$0x20, %al		/* non-specific EOI */
	outb	%al, $0x20
	pop	%rdx
	pop	%rax
	iretq

unexpected:
	movl	$99, 8(%r15)
1:	hlt
	jmp	1b

	idt_helpers

ready:	.ascii	"ready\n"
	.equ	ready_len, . - ready
