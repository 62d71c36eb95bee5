//! What a denied system call does: the filter traps it (SIGSYS), and this
//! handler writes one line to stderr,
//! `kiln: seccomp: thread kiln-vcpu0 made a forbidden system call 41 (socket)`,
//! then makes the same call again: the filter traps it again while SIGSYS
//! is blocked (in its own handler), so the kernel resets SIGSYS to its
//! default action and the process dies by SIGSYS.
//!
//! Everything here runs in a signal handler: no allocation, no lock, only
//! write(2) and the thread's name kept in a thread-local when its filter
//! was installed.

use std::cell::Cell;

use vmm_sys_util::signal::register_signal_handler;

use super::syscall_names::syscall_name;

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// Longest thread name kept (Linux names have at most 15 bytes).
const NAME_MAX: usize = 16;

thread_local! {
    /// This thread's name, set when kiln installed its filter; empty for a
    /// thread kiln did not filter itself.
    static THREAD_NAME: Cell<[u8; NAME_MAX]> = const { Cell::new([0; NAME_MAX]) };
}

/// Remembers the calling thread's name for the line a denied call prints.
pub(super) fn set_thread_name(name: &str) {
    let mut buf = [0; NAME_MAX];
    let len = name.len().min(NAME_MAX);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.set(buf);
}

/// Installs the SIGSYS handler, once per process. An embedder's own SIGSYS
/// handler is left in place (it then sees kiln's denied calls, and kiln
/// prints nothing).
pub(super) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction is plain data, filled in by the call below.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: only reads SIGSYS's action into a valid struct.
        if unsafe { libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut current) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        if current.sa_sigaction != libc::SIG_DFL {
            log::warn!("seccomp: SIGSYS already has a handler; kiln's denied calls go to it");
            return Ok(());
        }
        register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| e.errno())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// The SIGSYS part of `siginfo_t` (the kernel's `_sigsys`), after the
/// three ints every siginfo starts with and their padding.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes), whose first
    // 32 bytes are laid out as `SigsysInfo` for SIGSYS.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    if info.code == SYS_SECCOMP {
        let name = THREAD_NAME.get();
        let mut line = Line::default();
        line.push(b"kiln: seccomp: thread ");
        match name.iter().position(|&b| b == 0).unwrap_or(NAME_MAX) {
            0 => line.push(b"?"),
            len => line.push(&name[..len]),
        }
        line.push(b" made a forbidden system call ");
        line.push_number(i64::from(info.syscall));
        if let Some(call) = syscall_name(i64::from(info.syscall)) {
            line.push(b" (");
            line.push(call.as_bytes());
            line.push(b")");
        }
        line.push(b"\n");
        // SAFETY: writes initialised bytes of a stack buffer to stderr.
        unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
        // SAFETY: the kernel passes the interrupted thread's ucontext; the
        // same call again is trapped again (filters depend only on the call
        // and its arguments), now with SIGSYS blocked: the process dies.
        unsafe { repeat_call(info.syscall, &*context.cast::<libc::ucontext_t>()) };
    }
    // Not a seccomp trap (kill -SYS), or the call went through after all:
    // die as SIGSYS's default action would have.
    // SAFETY: resets SIGSYS to its default, unblocks it and raises it.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Makes system call `nr` with the arguments it had in `context`.
///
/// # Safety
/// Only for a call the filter denies (it does not run), from its SIGSYS
/// handler.
unsafe fn repeat_call(nr: libc::c_int, context: &libc::ucontext_t) {
    let regs = &context.uc_mcontext.gregs;
    let arg = |reg: libc::c_int| regs[reg as usize];
    // SAFETY: the caller's contract: the filter stops the call.
    unsafe {
        libc::syscall(
            libc::c_long::from(nr),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        )
    };
}

/// A line built without allocating.
struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_holds_names_and_numbers() {
        let mut line = Line::default();
        line.push(b"call ");
        line.push_number(41);
        line.push(b" ");
        line.push_number(0);
        line.push(b" ");
        line.push_number(-7);
        assert_eq!(&line.buf[..line.len], b"call 41 0 -7");
        assert_eq!(syscall_name(41), Some("socket"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(435), Some("clone3"));
        assert_eq!((syscall_name(400), syscall_name(-1)), (None, None));
    }
}
