/*
 * spin: loops forever without any exit; only a timeout can stop it.
 */
	.code64
	.text
	.globl	_start
_start:
	jmp	_start
