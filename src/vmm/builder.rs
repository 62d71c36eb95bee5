//! Builds a VM from a [`VmConfig`]: the one place where a configuration
//! becomes guest memory, a loaded kernel and initramfs, devices, boot
//! parameters and vCPUs, in that order. The VM is then ready to run.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use kiln_devices::virtio::block::{Block, DiskImage};
use kiln_devices::virtio::console::{SharedWriter, VirtioConsole};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::Vsock;
use kiln_init::spec::ExecSpec;
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestMemoryMmap;

use super::ConsoleIo;
use crate::boot::params::InitrdPlacement;
use crate::boot::{self, cmdline::CmdlineParts, mptable, LoadedKernel};
use crate::config::{
    ConsoleKind, DiskConfig, NetConfig, RateLimit, RootShare, ShareConfig, VmConfig, VsockConfig,
};
use crate::console::{ConsoleOutput, PanicWatch};
use crate::device_manager::{self, Buses, DeviceHandles, DeviceManager};
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::host_profile::HostProfile;
use crate::lifecycle::Lifecycle;
use crate::rootfs::{self, Rootfs};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::Snapshot;
use crate::vcpu::install_kick_handler;
use crate::vm::Vm;
use crate::{initramfs, memory};

/// A VM ready for its first KVM_RUN.
pub(crate) struct BuiltVm {
    pub vm: Vm,
    /// Guest RAM: must outlive every vCPU.
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuFd>,
    pub buses: Buses,
    /// The devices whose state a snapshot saves.
    pub devices: DeviceHandles,
    /// Every device's host-side work and the VM's own events.
    pub event_loop: EventLoop,
    pub panic_watch: PanicWatch,
}

/// Builds the VM `config` describes, reporting to `life`.
pub(crate) fn build(config: &VmConfig, io: ConsoleIo, life: &Arc<Lifecycle>) -> Result<BuiltVm> {
    validate(config)?;
    let rootfs = rootfs::packed_or_attached(config)?;
    let profile = HostProfile::detect();
    let slots = virtio_slots(config, rootfs.as_ref());
    let cmdline = build_cmdline(config, &slots, profile)?;
    install_kick_handler()?;

    // Load the guest before opening /dev/kvm, so a bad kernel, initrd or
    // root is reported as such even on a host without KVM.
    // A vhost-user backend maps guest memory from a file it is handed.
    let mem = match crate::share::all_shares(config).is_empty() {
        true => memory::create_guest_memory(config.mem_bytes)?,
        false => memory::create_shared_guest_memory(config.mem_bytes)?,
    };
    let (kernel, initrd) = load_kernel_and_initramfs(config, &mem, rootfs.as_ref(), life)?;
    stop_point(life)?;
    let vm = Vm::new(&mem)?;
    if usize::from(config.vcpus) > vm.max_vcpus() {
        return Err(Error::Config(format!(
            "--cpus {} is more than this host's KVM allows ({})",
            config.vcpus,
            vm.max_vcpus()
        )));
    }

    let (output, panic_watch) = ConsoleOutput::new(io.output);
    // The UART and a virtio console print to the same output.
    let output = SharedWriter::new(Box::new(output));
    let mut event_loop = EventLoop::new()?;
    let mut devices =
        DeviceManager::new(&vm, &mem, &mut event_loop, life, Box::new(output.clone()))?;
    let root = RootDisk::Fresh;
    if let Some(input) =
        attach_virtio_devices(&slots, &mut devices, &output, io.input, config, root)?
    {
        devices.attach_serial_input(input)?;
    }
    devices.watch_vm_events(life, panic_watch.clone())?;
    let highest_irq = devices.highest_irq();
    let (buses, devices) = devices.into_parts();

    boot::params::write_boot_info(&mem, &kernel, &cmdline, initrd, config.mem_bytes)?;
    boot::cpu_state::write_boot_tables(&mem, kernel.entry)?;
    mptable::setup_mptable(&mem, config.vcpus, highest_irq)?;
    let vcpus = create_vcpus(config, &vm, profile, kernel.entry)?;
    stop_point(life)?;
    Ok(BuiltVm {
        vm,
        mem,
        vcpus,
        buses,
        devices,
        event_loop,
        panic_watch,
    })
}

/// Builds a fresh VM from `snapshot` (its files already checked): guest
/// memory mapped privately from the memory file, the devices a boot of
/// `config` would build (the same slot walk: the same MMIO windows and
/// IRQs), the vCPUs and the VM restored to the saved state, then each
/// device's saved state applied (after the interrupt controllers, so that
/// an interrupt a device raises again is not overwritten).
/// `config` is the VM's configuration (the saved one with the restoring
/// front end's host side: `VmConfig::restored_from`).
pub(crate) fn build_restored(
    snapshot: &Snapshot,
    config: &VmConfig,
    io: ConsoleIo,
    life: &Arc<Lifecycle>,
) -> Result<BuiltVm> {
    validate(config)?;
    // A copy's guest had its network set up against its TAP: one that kiln
    // would create now is down and unaddressed.
    if let Some(net) = config
        .nets
        .iter()
        .find(|n| !kiln_devices::tap::interface_exists(&n.tap))
    {
        return Err(Error::Config(format!(
            "--net: TAP interface '{}' does not exist (a restored copy reopens an existing TAP; kiln creates one only for a boot)",
            net.tap
        )));
    }
    let rootfs = rootfs::packed_or_attached(config)?;
    let slots = virtio_slots(config, rootfs.as_ref());
    install_kick_handler()?;
    let mem = memory::map_guest_memory_file(config.mem_bytes, &snapshot.memory)
        .map_err(Error::io("mapping the snapshot's memory file"))?;
    let vm = Vm::new(&mem)?;
    let (output, panic_watch) = ConsoleOutput::new(io.output);
    let output = SharedWriter::new(Box::new(output));
    let mut event_loop = EventLoop::new()?;
    let mut devices =
        DeviceManager::new(&vm, &mem, &mut event_loop, life, Box::new(output.clone()))?;
    let root = RootDisk::Restored(snapshot);
    if let Some(input) =
        attach_virtio_devices(&slots, &mut devices, &output, io.input, config, root)?
    {
        devices.attach_serial_input(input)?;
    }
    devices.watch_vm_events(life, panic_watch.clone())?;
    let (buses, devices) = devices.into_parts();
    let vcpus = snapshot.restore_into(&vm)?;
    // The config names every card's MAC (`VmConfig::restored_from`).
    let macs: Vec<(usize, [u8; 6])> = slots
        .iter()
        .enumerate()
        .filter_map(|(slot, s)| match s {
            VirtioSlot::Net(_, net) => Some((slot, net.guest_mac())),
            _ => None,
        })
        .collect();
    snapshot.restore_devices(&devices, &macs)?;
    Ok(BuiltVm {
        vm,
        mem,
        vcpus,
        buses,
        devices,
        event_loop,
        panic_watch,
    })
}

/// Where the set-up gives up once the VM has been asked to stop (a signal
/// to `kiln run`, [`VmHandle::stop`](crate::VmHandle::stop)): between its
/// steps.
fn stop_point(life: &Lifecycle) -> Result<()> {
    match life.is_stopping() {
        true => Err(Error::Io {
            what: "setting up the VM",
            source: io::Error::new(io::ErrorKind::Interrupted, "stopped"),
        }),
        false => Ok(()),
    }
}

fn validate(config: &VmConfig) -> Result<()> {
    memory::validate_size(config.mem_bytes, memory::host_ram_bytes())?;
    if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
        return Err(Error::Config(format!(
            "--cpus {} is out of range (1 to {})",
            config.vcpus,
            mptable::MAX_CPUS
        )));
    }
    if config.boot_timeout.is_some() && config.agent_port.is_none() {
        return Err(Error::Config(
            "--boot-timeout is the wait for kiln's guest agent, which does not run with --vsock or an initrd's own init (rdinit=)".into(),
        ));
    }
    if let Some(name) = &config.hostname {
        crate::config::parse_hostname(name).map_err(|e| Error::Config(format!("hostname: {e}")))?;
    }
    for (i, net) in config.nets.iter().enumerate() {
        if config.nets[..i].iter().any(|n| n.tap == net.tap) {
            return Err(Error::Config(format!(
                "--net: TAP interface '{}' is given twice",
                net.tap
            )));
        }
    }
    Ok(())
}

/// The guest kernel command line a VM built from `config` gets, computed as
/// the run computes it (kiln's defaults, the host profile's words, one word
/// per device, the user's words), without building anything: `kiln run
/// --print-cmdline` prints it.
///
/// Fails as the run would, with the same [`Error`], on a configuration the
/// run refuses: memory or vCPUs out of range, a TAP given twice, an unusable
/// `rootfs` (only its first bytes are read), a line the kernel would cut.
/// The kernel itself is not read, and no KVM is needed:
///
/// ```
/// let mut config = kiln::VmConfig::new("vmlinux");
/// config.extra_cmdline = Some("ip=dhcp".into());
/// let line = kiln::kernel_cmdline(&config)?;
/// assert!(line.starts_with("console=ttyS0 ") && line.ends_with(" ip=dhcp"));
///
/// config.vcpus = 0;
/// assert!(matches!(kiln::kernel_cmdline(&config), Err(kiln::Error::Config(_))));
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn kernel_cmdline(config: &VmConfig) -> Result<String> {
    validate(config)?;
    let rootfs = rootfs::packed_or_attached(config)?;
    let slots = virtio_slots(config, rootfs.as_ref());
    let cmdline = build_cmdline(config, &slots, HostProfile::detect())?;
    Ok(cmdline_text(&cmdline))
}

fn cmdline_text(cmdline: &Cmdline) -> String {
    let text = cmdline.as_cstring().map(CString::into_bytes);
    String::from_utf8_lossy(&text.unwrap_or_default()).into_owned()
}

/// The command line for a VM with these virtio devices.
fn build_cmdline(
    config: &VmConfig,
    slots: &[VirtioSlot<'_>],
    profile: HostProfile,
) -> Result<Cmdline> {
    let mut device_words = Vec::with_capacity(slots.len());
    for (index, slot) in slots.iter().enumerate() {
        device_words.push(device_manager::virtio_mmio_word(index)?);
        device_words.extend(slot.cmdline_word());
    }
    // What kiln's init mounts after the shares.
    device_words.extend(config.tmpfs.iter().map(|t| t.cmdline_word()));
    let cmdline = boot::cmdline::build(&CmdlineParts {
        verbose: config.verbose,
        host_additions: profile.kernel_cmdline_additions(),
        devices: device_words,
        user: config.extra_cmdline.as_deref(),
    })?;
    log::info!("kernel command line: {}", cmdline_text(&cmdline));
    Ok(cmdline)
}

/// One virtio device of a VM; its place in [`virtio_slots`] is its MMIO
/// window and IRQ, and the guest's name for it.
enum VirtioSlot<'a> {
    /// The image, and where its overlay (the guest's writes) goes.
    RootImage(&'a Path, Option<&'a Path>),
    Disk(&'a DiskConfig),
    Rng(&'a RateLimit),
    Vsock(&'a VsockConfig),
    Net(usize, &'a NetConfig),
    /// A shared directory (virtio-fs) and its index among the shares.
    Share(usize, &'a ShareConfig),
    /// A shared root directory, its index among the shares (the last).
    RootShare(usize, RootShare),
    Console,
}

/// The virtio devices `config` asks for, in a stable order (the guest names
/// them in this order: the first disk is vda). An image root comes first,
/// so it is always vda and `--disk`s follow it. Both the command line and
/// the attaching walk this list, so they cannot disagree.
fn virtio_slots<'a>(config: &'a VmConfig, rootfs: Option<&'a Rootfs>) -> Vec<VirtioSlot<'a>> {
    let mut slots = Vec::new();
    if let Some(Rootfs::Image(path)) = rootfs {
        slots.push(VirtioSlot::RootImage(path, config.scratch_dir.as_deref()));
    }
    slots.extend(config.disks.iter().map(VirtioSlot::Disk));
    if config.rng {
        slots.push(VirtioSlot::Rng(&config.rng_rate_limit));
    }
    slots.extend(config.vsock.iter().map(VirtioSlot::Vsock));
    slots.extend(
        config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| VirtioSlot::Net(i, n)),
    );
    slots.extend(
        config
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| VirtioSlot::Share(i, s)),
    );
    if let (Some(_), Some(mode)) = (&config.rootfs, config.rootfs_share) {
        slots.push(VirtioSlot::RootShare(config.shares.len(), mode));
    }
    if config.console == ConsoleKind::Virtio {
        slots.push(VirtioSlot::Console);
    }
    slots
}

impl VirtioSlot<'_> {
    /// A command-line word the device needs besides its `virtio_mmio.device=`.
    fn cmdline_word(&self) -> Option<String> {
        match self {
            Self::RootImage(..) => Some(format!(
                "{}={}",
                kiln_init::ROOT_PARAM,
                rootfs::IMAGE_DEVICE
            )),
            // After the default console=ttyS0: the last console= is /dev/console.
            Self::Console => Some("console=hvc0".into()),
            // What kiln's init mounts, where.
            Self::Share(i, share) => Some(kiln_init::share_word(
                &crate::share::tag(*i),
                share.read_only,
                &share.guest_path,
            )),
            // What kiln's init switches root into.
            Self::RootShare(i, mode) => Some(kiln_init::share_root_word(
                &crate::share::tag(*i),
                *mode == RootShare::Overlay,
            )),
            _ => None,
        }
    }
}

/// Where an image root's overlay (the guest's writes) starts from.
#[derive(Clone, Copy)]
enum RootDisk<'a> {
    /// Empty: the guest sees the image as it is.
    Fresh,
    /// A copy of the overlay saved in this snapshot.
    Restored(&'a Snapshot),
}

/// Creates and attaches the devices of `slots`, in order. With a virtio
/// console, kiln's input and output become the guest's /dev/console (hvc0)
/// and the UART gets no input. Returns the input the UART should read.
fn attach_virtio_devices(
    slots: &[VirtioSlot<'_>],
    devices: &mut DeviceManager<'_>,
    output: &SharedWriter,
    mut input: Option<File>,
    config: &VmConfig,
    root: RootDisk<'_>,
) -> Result<Option<File>> {
    let (seccomp, run_as) = (config.seccomp, config.run_as);
    use kiln_devices::virtio::net::{MacAddr, Net};
    let mut shares = match crate::share::all_shares(config).is_empty() {
        true => Vec::new(),
        false => crate::share::devices(config)?,
    }
    .into_iter();
    for slot in slots {
        match *slot {
            VirtioSlot::RootImage(path, scratch_dir) => {
                // Its writes go to an unnamed file: closing it (when the VM
                // ends, whatever way) deletes them.
                let image = match root {
                    RootDisk::Fresh => rootfs::root_disk(path, scratch_dir),
                    RootDisk::Restored(snapshot) => snapshot.root_disk(path, scratch_dir),
                }
                .map_err(Error::RootfsImage)?;
                let block = Block::new(image).map_err(Error::io("creating a virtio-blk device"))?;
                devices.attach_virtio(block)?;
            }
            VirtioSlot::Disk(disk) => {
                let image = DiskImage::open(&disk.path, disk.read_only, disk.id.as_deref())?;
                let block = Block::new(image)
                    .and_then(|block| block.with_rate_limit(&disk.rate_limit))
                    .map_err(Error::io("creating a virtio-blk device"))?;
                devices.attach_virtio(block)?;
            }
            VirtioSlot::Rng(limit) => {
                let rng = Rng::new()
                    .and_then(|rng| rng.with_rate_limit(limit))
                    .map_err(Error::io("creating the virtio-rng device"))?;
                devices.attach_virtio(rng)?;
            }
            VirtioSlot::Vsock(v) => {
                let vsock = Vsock::new(v.cid, &v.socket)?;
                if let Some(ids) = run_as {
                    // Removed by kiln at its end, once it runs as `ids`.
                    std::os::unix::fs::chown(&v.socket, Some(ids.uid), Some(ids.gid))
                        .map_err(Error::io("handing the vsock socket to the jail's ids"))?;
                }
                devices.attach_virtio(vsock)?;
            }
            VirtioSlot::Net(i, net) => {
                let dev = Net::with_tap(&net.tap, net.mac.map(MacAddr))?
                    .with_rate_limit(&net.rate_limit)
                    .map_err(Error::io("creating a virtio-net device"))?;
                log::info!("net: eth{i} on TAP '{}', MAC {}", net.tap, dev.mac());
                devices.attach_virtio(dev)?;
            }
            VirtioSlot::Share(..) | VirtioSlot::RootShare(..) => {
                let fs = shares.next().expect("one device per share");
                devices.attach_virtio(fs)?;
            }
            VirtioSlot::Console => {
                // Its writer thread filters itself before it writes anything.
                let start = Box::new(move || {
                    seccomp::install(ThreadKind::ConsoleOutput, seccomp).map_err(io::Error::other)
                });
                let console =
                    VirtioConsole::with_writer_start(Box::new(output.clone()), input.take(), start)
                        .map_err(Error::device_io("virtio console"))?;
                devices.attach_virtio(console)?;
            }
        }
    }
    Ok(input)
}

/// Puts the kernel and the initramfs into guest memory. A kernel that is
/// not Linux (a tiny test guest) gets no initramfs unless one was asked for:
/// building and copying kiln's 1 MB init archive is most of kiln's own
/// start-up work.
fn load_kernel_and_initramfs(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    rootfs: Option<&Rootfs>,
    life: &Arc<Lifecycle>,
) -> Result<(LoadedKernel, Option<InitrdPlacement>)> {
    let kernel = boot::kernel::load(mem, &config.kernel, config.use_pvh)?;
    log::debug!("kernel entry {:?}", kernel.entry);
    if !kernel.is_linux && config.initrd.is_none() && config.rootfs.is_none() {
        return Ok((kernel, None));
    }

    let spec = exec_spec(config)?;
    // The kernel unpacks concatenated archives: a user initrd first, then
    // kiln's (its entries and a directory or tar root), starting 4-aligned.
    let mut initramfs = match &config.initrd {
        Some(path) => {
            let file = boot::open_input("initrd", path, Some(config.mem_bytes))?;
            let mut data = Vec::new();
            // Bounded even if the file grows while it is read: what is past
            // guest memory fails to load below, as a larger file would.
            std::io::Read::read_to_end(
                &mut std::io::Read::take(file, config.mem_bytes + 1),
                &mut data,
            )
            .map_err(|source| Error::ReadFile {
                what: "initrd",
                path: path.clone(),
                source,
            })?;
            data
        }
        None => Vec::new(),
    };
    // A user initrd started by its own init (`--cmdline rdinit=...`) never
    // runs kiln's: the guest is spared unpacking kiln's 1 MB archive.
    if let Some(init) = config.own_init() {
        log::info!("initrd started by its own init {init}: kiln's init not added");
        let initrd = boot::params::load_initrd(mem, &kernel, config.mem_bytes, &initramfs)?;
        return Ok((kernel, Some(initrd)));
    }
    initramfs.resize(initramfs.len().next_multiple_of(4), 0);
    let limit = usize::try_from(config.mem_bytes).unwrap_or(usize::MAX);
    let life = life.clone();
    let stop = Box::new(move || life.is_stopping());
    let kiln_archive =
        initramfs::kiln_initramfs_with(&spec, config.agent_port, rootfs, limit, Some(stop))?;
    if let Some(warning) = rootfs.and_then(|r| r.large_root_warning(kiln_archive.len())) {
        log::warn!("{warning}");
    }
    initramfs.extend_from_slice(&kiln_archive);
    let initrd = boot::params::load_initrd(mem, &kernel, config.mem_bytes, &initramfs)?;
    Ok((kernel, Some(initrd)))
}

fn exec_spec(config: &VmConfig) -> Result<ExecSpec> {
    let mut spec = config.command.to_exec_spec();
    spec.hostname = config.hostname.as_ref().map(|h| h.as_bytes().to_vec());
    spec.validate()
        .map_err(|e| Error::Config(format!("command: {e}")))?;
    Ok(spec)
}

fn create_vcpus(
    config: &VmConfig,
    vm: &Vm,
    profile: HostProfile,
    entry: boot::BootEntry,
) -> Result<Vec<kvm_ioctls::VcpuFd>> {
    let supported = vm.supported_cpuid()?;
    (0..config.vcpus)
        .map(|id| {
            let fd = vm.create_vcpu(id)?;
            let mut cpuid = supported.clone();
            boot::cpuid::configure_vcpu_cpuid(&mut cpuid, id, config.vcpus, profile);
            fd.set_cpuid2(&cpuid)
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            boot::cpu_state::setup_common_vcpu(&fd)?;
            if id == 0 {
                boot::cpu_state::setup_boot_vcpu(&fd, entry)?;
            }
            Ok(fd)
        })
        .collect()
}
