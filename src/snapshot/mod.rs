//! Snapshots of a running VM: pause it at a safe point, save the
//! guest-visible KVM state of the VM and its vCPUs and guest memory into a
//! directory, and restore that into a fresh VM (in this process or
//! another) that resumes at the very next instruction.
//!
//! Done: vCPU state in Firecracker's order (`vcpu_state.rs`), the PIT,
//! KVM clock and interrupt controllers (`vm_state.rs`), guest memory
//! written to a sparse file and mapped MAP_PRIVATE at restore (the file is
//! opened read-only and never written), a versioned state file with a
//! header and a checksum (`format.rs`), typed errors (`error.rs`), the TSC
//! frequency check (refused where KVM cannot scale the TSC, as on PVM).
//! The pause itself is `crate::pause`.
//!
//! Not done yet: device state (the UART, the i8042 and the control page
//! restart fresh; virtio devices are not saved, so a VM with any is
//! refused), XSAVE areas larger than 4 KiB (AMX), the CLI and the sandbox
//! API. A restored VM runs with the saved configuration (its seccomp mode,
//! timeout and jail ids): the front ends will pass their own. Internal for
//! now: the functions here are public only for kiln's tests.

mod error;
mod format;
mod host_cpu;
mod vcpu_state;
mod vm_state;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::SnapshotError;
use format::{Header, SavedVm, FORMAT_VERSION, MEMORY_FILE, STATE_FILE};
use host_cpu::HostCpu;
use kvm_ioctls::VcpuFd;
use vcpu_state::VcpuState;
use vm_state::VmState;

use crate::pause::PauseError;
use crate::vm::Vm;
use crate::vmm::{ConsoleIo, VmHandle};

/// What [`save`] did, measured.
#[derive(Clone, Copy, Debug)]
pub struct SaveReport {
    /// From the call to every vCPU parked.
    pub pause: Duration,
    /// From the call to both files written.
    pub total: Duration,
    pub state_bytes: u64,
    pub memory_bytes: u64,
}

impl From<PauseError> for SnapshotError {
    fn from(_: PauseError) -> Self {
        SnapshotError::NotRunning
    }
}

/// Pauses `vm` and saves it into `dir` (created if needed; a snapshot
/// already there is refused). The VM stays paused: [`resume`] it or stop it.
pub fn save(vm: &VmHandle, dir: &Path) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let running = vm.running().ok_or(SnapshotError::NotRunning)?;
    if crate::vmm::has_virtio_devices(&running.config) {
        return Err(SnapshotError::Unsupported(
            "the VM has virtio devices, whose state is not saved yet".into(),
        ));
    }
    // Without it KVM ignores `immediate_exit`: a vCPU could not complete
    // its exit without running the guest on (see `vcpu::complete_exit`).
    if !running
        .vm
        .kvm()
        .check_extension(kvm_ioctls::Cap::ImmediateExit)
    {
        return Err(SnapshotError::Unsupported(
            "KVM lacks KVM_CAP_IMMEDIATE_EXIT: a vCPU cannot be paused at a safe point".into(),
        ));
    }
    vcpu_state::check_xsave_size(running.vm.fd())?;
    let msr_indices = Arc::new(vcpu_state::msrs_to_save(running.vm.kvm())?);
    running.pause.pause()?;
    let pause = started.elapsed();

    let mut vcpus = Vec::with_capacity(running.pause.vcpus());
    for id in 0..running.pause.vcpus() {
        let indices = msr_indices.clone();
        vcpus.push(
            running
                .pause
                .on_vcpu(id, move |fd| VcpuState::save(fd, &indices))??,
        );
    }
    let tsc_khz = running.pause.on_vcpu(0, vcpu_state::tsc_khz)??;
    let saved = SavedVm {
        config: (*running.config).clone(),
        vcpus,
        vm: VmState::save(running.vm.fd())?,
    };

    std::fs::create_dir_all(dir).map_err(SnapshotError::io("create directory", dir))?;
    let header = Header {
        format_version: FORMAT_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        host_cpu: HostCpu::detect(),
        tsc_khz,
        cpuid: saved.vcpus[0].cpuid.clone(),
        memory_bytes: saved.config.mem_bytes,
        state_bytes: 0,
        state_crc32: 0,
    };
    let state_bytes = write_files(dir, &running.mem, header, &saved)?;
    Ok(SaveReport {
        pause,
        total: started.elapsed(),
        state_bytes,
        memory_bytes: saved.config.mem_bytes,
    })
}

/// Writes the memory file, then the state file; what this call created is
/// removed again if either fails (an existing file is refused, never
/// touched). Returns the state file's size.
fn write_files(
    dir: &Path,
    mem: &vm_memory::GuestMemoryMmap,
    header: Header,
    saved: &SavedVm,
) -> Result<u64, SnapshotError> {
    let memory_path = dir.join(MEMORY_FILE);
    let mut memory = File::options()
        .write(true)
        .create_new(true)
        .open(&memory_path)
        .map_err(SnapshotError::io("create", &memory_path))?;
    let written = crate::memory::write_guest_memory(mem, &mut memory)
        .map_err(SnapshotError::io("write", &memory_path))
        .and_then(|()| format::write_state(&dir.join(STATE_FILE), header, saved));
    if written.is_err() {
        let _ = std::fs::remove_file(&memory_path);
    }
    written
}

/// The VM configuration saved in the snapshot in `dir` (its state file
/// read and checked): what a restore's jail and front ends plan with.
pub(crate) fn saved_config(dir: &Path) -> Result<crate::VmConfig, SnapshotError> {
    format::read_state(&dir.join(STATE_FILE)).map(|(_, saved)| saved.config)
}

/// Lets a VM paused by [`save`] run on.
pub fn resume(vm: &VmHandle) {
    if let Some(running) = vm.running() {
        running.pause.resume();
    }
}

/// Starts a fresh VM from the snapshot in `dir`, which is only read. The
/// files are checked before anything runs (a [`SnapshotError`] inside
/// [`Error::Snapshot`](crate::Error::Snapshot)); the VM is then built on
/// its own thread, as by [`spawn`](crate::spawn), with the saved
/// configuration (its seccomp mode and timeout included), and `io` as its
/// console. `started` is the origin of the reported times.
pub fn restore(dir: &Path, io: ConsoleIo, started: Instant) -> crate::Result<VmHandle> {
    let snapshot = Snapshot::open(dir)?;
    let config = snapshot.saved.config.clone();
    let build_config = config.clone();
    let (vm, gate) = crate::vmm::spawn_built(config, started, move |life| {
        crate::vmm::build_restored(&snapshot, &build_config, io, life)
    })?;
    gate.open();
    Ok(vm)
}

/// A snapshot directory whose files passed every check.
pub(crate) struct Snapshot {
    header: Header,
    pub(crate) saved: SavedVm,
    /// Opened read-only: the restored VM maps it privately.
    pub(crate) memory: File,
}

impl Snapshot {
    pub(crate) fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let (header, saved) = format::read_state(&dir.join(STATE_FILE))?;
        let host = HostCpu::detect();
        if host.vendor != header.host_cpu.vendor {
            return Err(SnapshotError::IncompatibleCpu {
                saved: header.host_cpu.vendor,
                host: host.vendor,
            });
        }
        if host.model != header.host_cpu.model {
            log::info!(
                "snapshot taken on a {}, restored on a {}",
                header.host_cpu.model,
                host.model
            );
        }
        let memory_path: PathBuf = dir.join(MEMORY_FILE);
        let memory = crate::boot::open_regular_file(&memory_path)
            .map_err(SnapshotError::io("open", &memory_path))?;
        let found = memory
            .metadata()
            .map_err(SnapshotError::io("read the size of", &memory_path))?
            .len();
        if found != header.memory_bytes || header.memory_bytes != saved.config.mem_bytes {
            return Err(SnapshotError::MemorySize {
                path: memory_path,
                expected: header.memory_bytes,
                found,
            });
        }
        if saved.vcpus.len() != usize::from(saved.config.vcpus) {
            return Err(SnapshotError::Corrupt {
                path: dir.join(STATE_FILE),
                reason: format!(
                    "{} vCPU states for {} vCPUs",
                    saved.vcpus.len(),
                    saved.config.vcpus
                ),
            });
        }
        Ok(Self {
            header,
            saved,
            memory,
        })
    }

    /// Creates the vCPUs of `vm` (fresh, its guest memory mapped) and
    /// restores them and then the VM, in Firecracker's restore order.
    pub(crate) fn restore_into(&self, vm: &Vm) -> Result<Vec<VcpuFd>, SnapshotError> {
        let mut vcpus = Vec::with_capacity(self.saved.vcpus.len());
        for (id, state) in self.saved.vcpus.iter().enumerate() {
            let fd = vm
                .fd()
                .create_vcpu(id as u64)
                .map_err(SnapshotError::kvm("KVM_CREATE_VCPU"))?;
            vcpu_state::match_tsc_khz(vm.kvm(), &fd, self.header.tsc_khz)?;
            state.restore(&fd)?;
            vcpus.push(fd);
        }
        self.saved.vm.restore(vm.fd())?;
        Ok(vcpus)
    }
}
