/*
 * ap_start: the boot CPU starts the second vCPU, which prints.
 *
 * vCPU 0 copies a real-mode stub to 0x4000, software-enables its local
 * APIC (SVR) and sends INIT to APIC ID 1 through the xAPIC's ICR
 * (0xfee00300/310), then STARTUP IPIs with vector 4 (start at 0x4000)
 * until vCPU 1 sets the byte at 0x5000: a STARTUP that KVM takes before
 * it has finished the INIT is lost, so firmware sends it again, and KVM
 * ignores one that comes after the start. vCPU 0 then prints "bsp\n" and
 * halts with interrupts off. vCPU 1 wakes in real mode at 0400:0000,
 * prints "ap\n", sets the byte and halts too. Nothing ends the VM: the
 * host stops it. "ap\n" on the console is an event that vCPU 1's thread
 * runs.
 */
	.equ	STUB, 0x4000
	.equ	STARTED, 0x5000		/* vCPU 1 sets it to 1 */
	.equ	APIC, 0xfee00000
	.equ	COM1, 0x3f8

	.code64
	.text
	.globl	_start
_start:
	lea	ap(%rip), %rsi
	mov	$STUB, %edi
	mov	$ap_len, %ecx
1:	movb	(%rsi), %al
	movb	%al, (%rdi)
	inc	%rsi
	inc	%rdi
	loop	1b

	movb	$0, STARTED
	mov	$APIC, %edi		/* a register: disp32 would sign-extend */
	movl	$0x1ff, 0xf0(%rdi)	/* SVR: APIC enabled, spurious vector 0xff */
	movl	$0x01000000, 0x310(%rdi)	/* ICR high: APIC ID 1 */
	movl	$0x00004500, 0x300(%rdi)	/* ICR low: INIT, assert */
sipi:	movl	$0x01000000, 0x310(%rdi)
	movl	$0x00004600 + (STUB >> 12), 0x300(%rdi)	/* STARTUP, vector 4 */
	mov	$10000, %ecx
2:	cmpb	$0, STARTED
	jne	started
	loop	2b
	jmp	sipi

started:
	lea	bsp(%rip), %rsi
	mov	$bsp_len, %ecx
	mov	$COM1, %dx
1:	lodsb
	outb	%al, %dx
	loop	1b
	cli
3:	hlt
	jmp	3b

bsp:	.ascii	"bsp\n"
	.equ	bsp_len, . - bsp

/* Copied to STUB and run there by vCPU 1, in real mode (CS = 0x0400). */
	.code16
ap:	mov	$COM1, %dx
	mov	$0x61, %al		/* 'a' */
	outb	%al, %dx
	mov	$0x70, %al		/* 'p' */
	outb	%al, %dx
	mov	$0x0a, %al		/* '\n' */
	outb	%al, %dx
	movb	$1, STARTED		/* DS is 0 after INIT: the byte at 0x5000 */
	cli
4:	hlt
	jmp	4b
	.equ	ap_len, . - ap
