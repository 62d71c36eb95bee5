//! Snapshots of a running VM: pause it at a safe point, save the
//! guest-visible state of the VM, its vCPUs and its devices and guest
//! memory into a directory, and restore that into a fresh VM (in this
//! process or another) that resumes at the very next instruction.
//!
//! Saved: vCPU state in Firecracker's order (`vcpu_state.rs`), the PIT,
//! KVM clock and interrupt controllers (`vm_state.rs`), guest memory
//! written to a sparse file and mapped MAP_PRIVATE at restore (the file is
//! opened read-only and never written), a versioned state file with a
//! header and a checksum (`format.rs`), typed errors (`error.rs`), the TSC
//! frequency check (refused where KVM cannot scale the TSC, as on PVM).
//! The pause itself is `crate::pause`: the vCPUs and the event thread, so
//! no device touches guest memory or its queues while they are saved.
//! Every file is created new relative to the open directory (`dir.rs`), so
//! a sandbox's jailed VM process saves into a directory its sandbox opened
//! and sent it, with the sandbox's view of the configuration.
//!
//! Devices: the UART's registers and unread input, and every virtio
//! device's transport (status, features, config space, each queue's size,
//! addresses and indices: `kiln_devices::virtio::persist`), in slot order.
//! A restore builds the devices a boot of the configuration would (same
//! MMIO windows and IRQs), restores the vCPUs and interrupt controllers,
//! then applies the saved states: a device the driver had running starts
//! again with its saved queues without the guest doing anything. A device
//! list or value that does not fit is [`SnapshotError::Devices`].
//!
//! Host resources are reopened, not saved: disk files by path, the TAP by
//! name, the vsock socket anew. So every vsock connection from before is
//! gone: the device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET once restored
//! (the guest's sockets see a reset; kiln's agent reconnects). A net
//! device's frames in flight are lost, as on a real link. An image root's
//! overlay (what the guest wrote) is copied sparse into the snapshot
//! (`disk<slot>.overlay`, with its chunk map in the state), and each
//! restored VM starts its own new overlay from a copy of it; the base image
//! must be unchanged (size and mtime), or the restore fails with
//! `DiskError::BaseChanged`. A writable `--disk` (the user's file written
//! in place) is refused at save ([`SnapshotError::WritableDisk`]); read-only
//! disks are reopened by path.
//!
//! Not saved: the i8042 and the control page (they start fresh, as
//! before device state was saved), the virtio console's host-side
//! buffers, counters, XSAVE areas larger than 4 KiB (AMX). A read-only disk
//! changed since the save is not detected (its config space keeps the
//! saved capacity; requests past its end fail). The functions here are
//! public only for kiln's front ends and tests.

mod dir;
mod error;
mod format;
mod host_cpu;
mod vcpu_state;
mod vm_state;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use dir::SnapshotDir;
pub use error::SnapshotError;
use format::{
    disk_file, DevicesState, Header, SavedDisk, SavedVm, FORMAT_VERSION, MEMORY_FILE, STATE_FILE,
};
use host_cpu::HostCpu;
use kiln_devices::virtio::net::MacAddr;
use kiln_devices::virtio::SavedOverlay;
use kvm_ioctls::VcpuFd;
use vcpu_state::VcpuState;
use vm_state::VmState;

use crate::device_manager::DeviceHandles;
use crate::pause::PauseError;
use crate::vm::Vm;
use crate::vmm::{ConsoleIo, VmHandle};

/// What [`save`] did, measured.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
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

/// Pauses `vm` and saves it into `dir` (created owner-only if needed; a
/// snapshot already there is refused; a refused save leaves no directory
/// it created). The VM stays paused: [`resume`] it or stop it.
pub fn save(vm: &VmHandle, dir: &Path) -> Result<SaveReport, SnapshotError> {
    SnapshotDir::save_new(dir, |dir| save_into(vm, dir, None))
}

/// Saves `vm` into `dir` as [`save`] does and lets it run on (resumed
/// whether or not the save got as far as the pause).
pub(crate) fn save_live(
    vm: &VmHandle,
    dir: &SnapshotDir,
    host_side: Option<&crate::VmConfig>,
) -> Result<SaveReport, SnapshotError> {
    let saved = save_into(vm, dir, host_side);
    resume(vm);
    saved
}

/// Why a VM of `config` cannot be snapshotted for its shared directories
/// (`--share`, a shared root), if it has any: a restore would need its own
/// virtiofsd, and the guest's open files on the share (held by the saved
/// daemon) would be gone. `kiln snapshot create` asks before it boots.
pub(crate) fn shares_refusal(config: &crate::VmConfig) -> Option<String> {
    if let Some(share) = config.shares.first() {
        return Some(format!(
            "a VM with shared directories (--share {}) cannot be snapshotted yet",
            share.host_dir.display()
        ));
    }
    match (&config.rootfs, config.rootfs_share) {
        (Some(dir), Some(_)) => Some(format!(
            "a VM with a shared root (--rootfs {},share) cannot be snapshotted yet",
            dir.display()
        )),
        _ => None,
    }
}

/// Pauses `vm` and saves it into the open directory `dir`: the one save
/// path. The saved configuration is the VM's own, with the host-side
/// options (paths of sockets and scratch directories, ids; see
/// [`VmConfig::restored_from`](crate::VmConfig)) of `host_side` when given:
/// a jailed VM's own are those of its jail, a restore needs the host's.
fn save_into(
    vm: &VmHandle,
    dir: &SnapshotDir,
    host_side: Option<&crate::VmConfig>,
) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let running = vm.running().ok_or(SnapshotError::NotRunning)?;
    // A clone would write the user's file in place, as the VM saved does.
    if let Some(disk) = running.config.disks.iter().find(|d| !d.read_only) {
        return Err(SnapshotError::WritableDisk(disk.path.clone()));
    }
    if let Some(why) = shares_refusal(&running.config) {
        return Err(SnapshotError::Unsupported(why));
    }
    if !running.vcpus_can_park() {
        return Err(SnapshotError::Unsupported(
            "KVM lacks KVM_CAP_IMMEDIATE_EXIT: a vCPU cannot be paused at a safe point".into(),
        ));
    }
    vcpu_state::check_xsave_size(running.vm.fd())?;
    let msr_indices = Arc::new(vcpu_state::msrs_to_save(running.vm.kvm())?);
    running.pause.pause()?;
    // No device runs from here until `resume`: none touches guest memory
    // or its queues while they are saved.
    running.loop_pause.pause()?;
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
    let (devices, overlays) = save_devices(&running.devices)?;
    let config = match host_side {
        Some(host) => host
            .restored_from(&running.config)
            .map_err(SnapshotError::Devices)?,
        None => (*running.config).clone(),
    };
    let saved = SavedVm {
        config,
        vcpus,
        vm: VmState::save(running.vm.fd())?,
        devices,
    };

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
    let state_bytes = write_files(dir, &running.mem, &overlays, header, &saved)?;
    Ok(SaveReport {
        pause,
        total: started.elapsed(),
        state_bytes,
        memory_bytes: saved.config.mem_bytes,
    })
}

/// Every device's guest-visible state (the VM is paused, its event loop
/// too), and the overlay files of its overlay disks by slot.
fn save_devices(
    devices: &DeviceHandles,
) -> Result<(DevicesState, Vec<(usize, File)>), SnapshotError> {
    let serial = devices.serial.lock().unwrap_or_else(|e| e.into_inner());
    let mut state = DevicesState {
        serial: serial.save(),
        virtio: Vec::with_capacity(devices.virtio.len()),
        disks: Vec::new(),
    };
    let mut overlays = Vec::new();
    for (slot, transport) in devices.virtio.iter().enumerate() {
        let transport = transport.lock().unwrap_or_else(|e| e.into_inner());
        state.virtio.push(transport.save());
        if let Some(overlay) = transport.disk_overlay() {
            let SavedOverlay { file, state: map } =
                overlay.map_err(|source| SnapshotError::Io {
                    what: "duplicate",
                    path: format!("the overlay of virtio slot {slot}").into(),
                    source,
                })?;
            state.disks.push(SavedDisk { slot, overlay: map });
            overlays.push((slot, file));
        }
    }
    Ok((state, overlays))
}

/// Writes the memory file, each overlay disk's file, then the state file;
/// what this call created is removed again if any fails (an existing file
/// is refused, never touched). Returns the state file's size.
fn write_files(
    dir: &SnapshotDir,
    mem: &vm_memory::GuestMemoryMmap,
    overlays: &[(usize, File)],
    header: Header,
    saved: &SavedVm,
) -> Result<u64, SnapshotError> {
    let mut created = Vec::new();
    let write = || {
        let mut memory = dir.create_file(MEMORY_FILE)?;
        created.push(MEMORY_FILE.to_string());
        crate::memory::write_guest_memory(mem, &mut memory)
            .map_err(SnapshotError::io("write", &dir.shown(MEMORY_FILE)))?;
        for (slot, overlay) in overlays {
            let name = disk_file(*slot);
            let file = dir.create_file(&name)?;
            created.push(name.clone());
            let size = saved
                .devices
                .disks
                .iter()
                .find(|d| d.slot == *slot)
                .map_or(0, |d| d.overlay.base.size());
            kiln_devices::virtio::block::copy_sparse(overlay, &file, size)
                .map_err(SnapshotError::io("write", &dir.shown(&name)))?;
        }
        format::write_state(dir, header, saved)
    };
    let written = write();
    if written.is_err() {
        for name in created {
            dir.remove_file(&name);
        }
    }
    written
}

/// The VM configuration saved in the snapshot in `dir` (its state file
/// read and checked): what a restore's jail and front ends plan with.
pub(crate) fn saved_config(dir: &Path) -> Result<crate::VmConfig, SnapshotError> {
    format::read_state(&dir.join(STATE_FILE)).map(|(_, saved)| saved.config)
}

/// Lets a VM paused by [`save`] run on; one its owner holds paused
/// ([`VmHandle::pause`]) gets its devices back and stays paused.
pub fn resume(vm: &VmHandle) {
    if let Some(running) = vm.running() {
        running.loop_pause.resume();
        if !running.held.load(std::sync::atomic::Ordering::SeqCst) {
            running.pause.resume();
        }
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
    dir: PathBuf,
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
        for disk in &saved.devices.disks {
            // As long as the disk: a shorter one would read as holes.
            let path = dir.join(disk_file(disk.slot));
            let file =
                crate::boot::open_regular_file(&path).map_err(SnapshotError::io("open", &path))?;
            let found = file
                .metadata()
                .map_err(SnapshotError::io("read the size of", &path))?
                .len();
            match found.cmp(&disk.overlay.base.size()) {
                std::cmp::Ordering::Less => return Err(SnapshotError::Truncated(path)),
                std::cmp::Ordering::Greater => {
                    return Err(SnapshotError::Corrupt {
                        path,
                        reason: format!("larger than the disk ({found} bytes)"),
                    })
                }
                std::cmp::Ordering::Equal => {}
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
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

    /// The image root at `path` (virtio slot 0) with the guest's writes
    /// saved in this snapshot under a new overlay of its own (at
    /// `scratch_dir`, as a boot puts it); the saved file is only read.
    pub(crate) fn root_disk(
        &self,
        path: &Path,
        scratch_dir: Option<&Path>,
    ) -> Result<kiln_devices::virtio::block::DiskImage, kiln_devices::virtio::block::DiskError>
    {
        let Some(saved) = self.saved.devices.disks.iter().find(|d| d.slot == 0) else {
            // Saved without an overlay: the slot check refuses it later.
            return crate::rootfs::root_disk(path, scratch_dir);
        };
        let overlay_path = self.dir.join(disk_file(saved.slot));
        let open_error = |source| kiln_devices::virtio::block::DiskError::Open {
            path: overlay_path.clone(),
            source,
        };
        let file = crate::boot::open_regular_file(&overlay_path).map_err(open_error)?;
        crate::rootfs::root_disk_restored(path, scratch_dir, &file, &saved.overlay)
    }

    /// Applies the saved device states to `devices`, built from the
    /// restored configuration: the same devices in the same slots, or a
    /// [`SnapshotError::Devices`]. The net device in each slot of `macs`
    /// shows that MAC in its config space (a copy moved to a new address).
    pub(crate) fn restore_devices(
        &self,
        devices: &DeviceHandles,
        macs: &[(usize, [u8; 6])],
    ) -> Result<(), SnapshotError> {
        let saved = &self.saved.devices;
        if saved.virtio.len() != devices.virtio.len() {
            return Err(SnapshotError::Devices(format!(
                "{} virtio devices saved, the configuration builds {}",
                saved.virtio.len(),
                devices.virtio.len()
            )));
        }
        for (slot, (state, transport)) in saved.virtio.iter().zip(&devices.virtio).enumerate() {
            let mut state = std::borrow::Cow::Borrowed(state);
            if let Some((_, mac)) = macs.iter().find(|(s, _)| *s == slot) {
                let config = &mut state.to_mut().config;
                kiln_devices::virtio::net::set_config_mac(config, MacAddr(*mac));
            }
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&state)
                .map_err(|e| SnapshotError::Devices(format!("virtio slot {slot}: {e}")))?;
        }
        devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&saved.serial)
            .map_err(|e| SnapshotError::Devices(e.to_string()))
    }
}
