//! The kernel loader (`kiln::boot::kernel::load`): any file as the kernel
//! image, ELF (with the PVH and Linux note walkers) or bzImage, loaded into
//! a small guest, then the initramfs placed and the boot information
//! written from what the image's headers say, as `kiln run` does. The
//! bound that matters here is memory: nothing is allocated by what a
//! header claims rather than what the file holds.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use kiln::boot::kernel::{load, BootEntry};
use kiln::fuzzing::{load_initrd, write_boot_info};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::Target;

/// The fuzz guest's memory: room for a small kernel above 1 MiB.
const MEM_BYTES: u64 = 8 << 20;

pub const TARGET: Target = Target {
    name: "kernel",
    run,
    // Program headers and notes read from the file (no more than it
    // holds), the command line and the boot structures.
    memory_cap: 256 << 10,
    memory_per_input_byte: 4,
    seeds,
};

fn run(data: &[u8]) {
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result
    // is checked before use.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).expect("memfd write");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)])
        .expect("guest memory");
    for use_pvh in [true, false] {
        let Ok(kernel) = load(&mem, &path, use_pvh) else {
            return;
        };
        if !use_pvh {
            assert!(
                matches!(kernel.entry, BootEntry::Linux64 { .. }),
                "PVH entry without PVH"
            );
        }
        let initrd = load_initrd(&mem, &kernel, MEM_BYTES, &[0x5a; 4096]).ok();
        let mut cmdline = Cmdline::new(2048).expect("command line");
        cmdline
            .insert_str("console=ttyS0 quiet")
            .expect("command line");
        let _ = write_boot_info(&mem, &kernel, &cmdline, initrd, MEM_BYTES);
    }
}

fn push_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// An ELF note: name and descriptor, each padded to 4 bytes.
fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    push_u32(&mut n, name.len() as u32);
    push_u32(&mut n, desc.len() as u32);
    push_u32(&mut n, kind);
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

/// A tiny x86-64 ELF kernel: one loadable segment at 1 MiB (`hlt` in a
/// loop) and a note segment with the PVH entry and, if `linux`, a Linux
/// note, as a vmlinux has.
fn tiny_elf(linux: bool) -> Vec<u8> {
    const ENTRY: u64 = 0x10_0000;
    let code = [0xf4, 0xeb, 0xfd]; // hlt; jmp .-1
    let mut notes = note(b"Xen\0", 18, &(ENTRY as u32).to_le_bytes());
    if linux {
        notes.extend(note(b"Linux\0", 6, &[0; 4]));
    }
    let (ehdr, phdr) = (64u64, 56u64);
    let code_at = ehdr + 2 * phdr;
    let notes_at = code_at + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    push_u16(&mut e, 2); // ET_EXEC
    push_u16(&mut e, 0x3e); // x86-64
    push_u32(&mut e, 1);
    push_u64(&mut e, ENTRY);
    push_u64(&mut e, ehdr); // e_phoff
    push_u64(&mut e, 0); // e_shoff
    push_u32(&mut e, 0);
    push_u16(&mut e, ehdr as u16);
    push_u16(&mut e, phdr as u16);
    push_u16(&mut e, 2); // e_phnum
    push_u16(&mut e, 64);
    push_u16(&mut e, 0);
    push_u16(&mut e, 0);
    for (p_type, offset, addr, size) in [
        (1u32, code_at, ENTRY, code.len() as u64), // PT_LOAD
        (4, notes_at, 0, notes.len() as u64),      // PT_NOTE
    ] {
        push_u32(&mut e, p_type);
        push_u32(&mut e, 5); // R+X
        push_u64(&mut e, offset);
        push_u64(&mut e, addr);
        push_u64(&mut e, addr);
        push_u64(&mut e, size);
        push_u64(&mut e, size);
        push_u64(&mut e, 4);
    }
    e.extend_from_slice(&code);
    e.extend_from_slice(&notes);
    e
}

/// A tiny bzImage: one setup sector with the boot protocol header (2.15,
/// loaded high, 64-bit entry), then a sector of "kernel".
fn tiny_bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 3 * 512];
    b[0x1f1] = 1; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: 64-bit entry
    b[2 * 512..].fill(0xf4);
    b
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("elf-pvh", tiny_elf(false)),
        ("elf-pvh-linux-note", tiny_elf(true)),
        ("bzimage", tiny_bzimage()),
    ]
}
