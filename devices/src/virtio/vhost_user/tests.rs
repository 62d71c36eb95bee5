//! The vhost-user frontend against a small in-test backend (the `vhost`
//! crate's backend-side message handler over a socketpair, with a handler
//! that records what it was told).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, BackendReqHandler, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use super::*;
use crate::irq::IrqLine;
use crate::virtio::fs::{virtio_fs, DEVICE_ID_FS, QUEUES};
use crate::virtio::test_queue::{pump, DriverQueue};
use crate::virtio::{Interrupt, INT_USED_RING};

type VuResult<T> = vhost::vhost_user::Result<T>;

const MEM_SIZE: usize = 1 << 20;
/// What the fake backend offers: VERSION_1, EVENT_IDX, INDIRECT_DESC,
/// vhost-user's protocol features, and a feature kiln does not pass on
/// (VIRTIO_F_NOTIFY_ON_EMPTY, bit 24).
const BACKEND_FEATURES: u64 = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 30) | (1 << 24);

/// What the fake backend was told.
#[derive(Default)]
struct Seen {
    owner: bool,
    features: Option<u64>,
    protocol: Option<u64>,
    /// (guest address, size, host address, mmap offset) and the file.
    regions: Vec<(u64, u64, u64, u64)>,
    region_files: Vec<File>,
    num: [Option<u32>; QUEUES],
    /// (descriptors, used, available) as host addresses.
    addr: [Option<(u64, u64, u64)>; QUEUES],
    base: [Option<u32>; QUEUES],
    kick: [Option<File>; QUEUES],
    call: [Option<File>; QUEUES],
    enabled: [bool; QUEUES],
    stopped: Vec<u32>,
}

struct FakeBackend {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: u64,
    seen: Arc<Mutex<Seen>>,
}

fn unused<T>() -> VuResult<T> {
    Err(vhost::vhost_user::Error::InvalidOperation(
        "not used by kiln",
    ))
}

impl VhostUserBackendReqHandlerMut for FakeBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        self.seen.lock().unwrap().owner = true;
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        unused()
    }
    fn reset_device(&mut self) -> VuResult<()> {
        unused()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.seen.lock().unwrap().features = Some(features);
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut seen = self.seen.lock().unwrap();
        seen.regions = ctx
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
            .collect();
        seen.region_files = files;
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.seen.lock().unwrap().num[index as usize] = Some(num);
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.seen.lock().unwrap().addr[index as usize] = Some((descriptor, used, available));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.seen.lock().unwrap().base[index as usize] = Some(base);
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.seen.lock().unwrap().stopped.push(index);
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.seen.lock().unwrap().kick[index as usize] = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.seen.lock().unwrap().call[index as usize] = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        unused()
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.seen.lock().unwrap().protocol = Some(features);
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.queues)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.seen.lock().unwrap().enabled[index as usize] = enable;
        Ok(())
    }
    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        unused()
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        unused()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unused()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unused()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        unused()
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unused()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unused()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unused()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unused()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unused()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unused()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unused()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unused()
    }
}

/// A fake backend served on its own thread until the connection ends;
/// `hang_up` is another handle on its socket, to cut the connection.
struct Peer {
    seen: Arc<Mutex<Seen>>,
    hang_up: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    fn cut(&mut self) {
        self.hang_up.shutdown(std::net::Shutdown::Both).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn backend(features: u64, protocol: VhostUserProtocolFeatures) -> (UnixStream, Peer) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fake = FakeBackend {
        features,
        protocol,
        queues: QUEUES as u64,
        seen: seen.clone(),
    };
    let mut handler = BackendReqHandler::from_stream(theirs, Arc::new(Mutex::new(fake)));
    let hang_up = handler.try_clone_connection().unwrap();
    let thread = std::thread::spawn(move || while handler.handle_request().is_ok() {});
    let peer = Peer {
        seen,
        hang_up,
        thread: Some(thread),
    };
    (ours, peer)
}

fn all_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
}

/// Guest memory in a memfd, mapped shared (as kiln maps it for vhost-user).
fn shared_memory() -> &'static GuestMemoryMmap {
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"kiln-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let mapping = MmapRegionBuilder::new(MEM_SIZE)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
    Box::leak(Box::new(
        GuestMemoryMmap::from_regions(vec![region]).unwrap(),
    ))
}

fn queues(mem: &'static GuestMemoryMmap) -> Vec<Queue> {
    (0..QUEUES)
        .map(|i| DriverQueue::new(mem, 0x10000 * (i as u64 + 1)).queue())
        .collect()
}

fn activation(mem: &'static GuestMemoryMmap, irq: &IrqLine) -> Activation {
    Activation {
        mem: mem.clone(),
        queues: queues(mem),
        interrupt: Interrupt::new(irq.try_clone().unwrap()),
        features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    }
}

fn fs_device(stream: UnixStream) -> VhostUserDevice {
    virtio_fs(
        "kiln-share0",
        VhostUserConnection::new(stream, QUEUES).unwrap(),
    )
    .unwrap()
}

fn read_eventfd(file: &mut File) -> u64 {
    let mut buf = [0u8; 8];
    file.read_exact(&mut buf).unwrap();
    u64::from_le_bytes(buf)
}

/// Set-up: the backend is owned, the guest is offered only the backend's
/// features kiln passes on, and kiln asks for only the protocol features
/// it uses among those the backend has.
#[test]
fn setup_negotiates_features_and_protocol_features() {
    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let device = fs_device(stream);
    assert_eq!(device.device_type(), DEVICE_ID_FS);
    assert_eq!(device.features(), (1 << 32) | (1 << 29) | (1 << 28));
    {
        let seen = peer.seen.lock().unwrap();
        assert!(seen.owner);
        let wanted = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ;
        assert_eq!(seen.protocol, Some(wanted.bits()));
    }
    let mut tag = [0u8; 12];
    device.read_config(0, &mut tag);
    assert_eq!(&tag, b"kiln-share0\0");
    drop(device);
    peer.cut();
}

/// DRIVER_OK hands the backend the memory table (the memfd, whole), then
/// each ring: size, host addresses, base, call and kick eventfds, enabled.
/// A kick by the guest reaches the backend; a call by the backend becomes
/// the device's interrupt with the used-ring status bit.
#[test]
fn activation_shares_memory_rings_and_eventfds() {
    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let device = Arc::new(Mutex::new(fs_device(stream)));
    let mut em = EventManager::<Arc<Mutex<VhostUserDevice>>>::new().unwrap();
    em.add_subscriber(device.clone());
    let mem = shared_memory();
    let irq = IrqLine::new().unwrap();
    let activation = activation(mem, &irq);
    let interrupt = activation.interrupt.clone();
    let expected_queues: Vec<(u16, u64, u64, u64)> = activation
        .queues
        .iter()
        .map(|q| (q.size(), q.desc_table(), q.used_ring(), q.avail_ring()))
        .collect();
    device.lock().unwrap().activate(activation).unwrap();

    let mut seen = peer.seen.lock().unwrap();
    // EVENT_IDX as the driver accepted it, plus vhost-user's own bit.
    assert_eq!(seen.features, Some((1 << 32) | (1 << 29) | (1 << 30)));
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    assert_eq!(seen.regions, vec![(0, MEM_SIZE as u64, host(0), 0)]);
    assert_eq!(seen.region_files.len(), 1);
    assert_eq!(
        seen.region_files[0].metadata().unwrap().len(),
        MEM_SIZE as u64
    );
    for (i, &(size, desc, used, avail)) in expected_queues.iter().enumerate() {
        assert_eq!(seen.num[i], Some(u32::from(size)), "queue {i}");
        assert_eq!(
            seen.addr[i],
            Some((host(desc), host(used), host(avail))),
            "queue {i}"
        );
        assert_eq!(seen.base[i], Some(0), "queue {i}");
        assert!(seen.enabled[i], "queue {i} not enabled");
    }

    // The guest kicks queue 1 (the KVM ioeventfd): the backend sees it.
    device.lock().unwrap().queue_events()[1].write(1).unwrap();
    assert_eq!(read_eventfd(seen.kick[1].as_mut().unwrap()), 1);

    // The backend calls on queue 1: the guest is interrupted.
    assert_eq!(interrupt.status(), 0);
    seen.call[1]
        .as_mut()
        .unwrap()
        .write_all(&1u64.to_le_bytes())
        .unwrap();
    drop(seen);
    pump(&mut em);
    assert_eq!(interrupt.status() & INT_USED_RING, INT_USED_RING);
    assert_eq!(irq.eventfd().read().unwrap(), 1);

    // A driver reset stops both rings.
    device.lock().unwrap().reset();
    assert_eq!(peer.seen.lock().unwrap().stopped, vec![0, 1]);
    drop(em);
    drop(device);
    peer.cut();
}

/// Anonymous guest memory cannot be shared: the activation fails (the
/// transport then sets DEVICE_NEEDS_RESET) with a line saying why.
#[test]
fn anonymous_memory_is_refused() {
    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let mut device = fs_device(stream);
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ));
    let irq = IrqLine::new().unwrap();
    let err = device.activate(activation(mem, &irq)).unwrap_err();
    assert!(err.to_string().contains("not file-backed"), "{err}");
    assert!(peer.seen.lock().unwrap().regions.is_empty());
    drop(device);
    peer.cut();
}

/// A backend without VIRTIO_F_VERSION_1, or with fewer queues than the
/// device needs, is refused at set-up.
#[test]
fn unusable_backends_are_refused() {
    let (stream, mut peer) = backend(1 << 30, all_protocol_features());
    let connection = VhostUserConnection::new(stream, QUEUES).unwrap();
    let err = virtio_fs("t", connection).err().unwrap();
    assert!(err.to_string().contains("VIRTIO_F_VERSION_1"), "{err}");
    peer.cut();

    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let err = VhostUserConnection::new(stream, QUEUES + 1).err().unwrap();
    assert!(err.to_string().contains("has 2 queues"), "{err}");
    peer.cut();
}

/// A backend that never answers fails the set-up after the timeout
/// instead of holding kiln.
#[test]
fn a_silent_backend_times_out() {
    let (ours, _silent) = UnixStream::pair().unwrap();
    let err = VhostUserConnection::with_reply_timeout(ours, QUEUES, Duration::from_millis(50))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("did not answer within 0.05 s"),
        "{err}"
    );
}

/// The backend hangs up: the event loop notices, stops watching the
/// socket (no busy loop), and the device refuses to start again.
#[test]
fn a_backend_hang_up_stops_the_device() {
    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let device = Arc::new(Mutex::new(fs_device(stream)));
    let mut em = EventManager::<Arc<Mutex<VhostUserDevice>>>::new().unwrap();
    em.add_subscriber(device.clone());
    pump(&mut em);
    assert!(!device.lock().unwrap().backend_gone());
    peer.cut();
    crate::virtio::test_queue::assert_idle(&mut em);
    assert!(device.lock().unwrap().backend_gone());
    let mem = shared_memory();
    let irq = IrqLine::new().unwrap();
    let err = device
        .lock()
        .unwrap()
        .activate(activation(mem, &irq))
        .unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

/// Once the backend is gone, kiln answers the guest's FUSE requests itself
/// with EIO: one the backend took but never finished (past the used ring's
/// index; the one before it, finished, is left alone), and one the guest
/// queues afterwards; a FORGET (no reply buffer) is returned empty.
#[test]
fn requests_after_the_backend_died_fail_with_eio() {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    let (stream, mut peer) = backend(BACKEND_FEATURES, all_protocol_features());
    let device = Arc::new(Mutex::new(fs_device(stream)));
    let mut em = EventManager::<Arc<Mutex<VhostUserDevice>>>::new().unwrap();
    em.add_subscriber(device.clone());
    let mem = shared_memory();
    let mut hiprio = DriverQueue::new(mem, 0x10000);
    let mut requests = DriverQueue::new(mem, 0x20000);
    let irq = IrqLine::new().unwrap();
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![hiprio.queue(), requests.queue()],
        interrupt: Interrupt::new(irq.try_clone().unwrap()),
        features: VIRTIO_F_VERSION_1,
    };
    let interrupt = activation.interrupt.clone();
    device.lock().unwrap().activate(activation).unwrap();

    // A FUSE request: a 40-byte header (unique at 8), room for a reply.
    let request = |unique: u64, at: u64| {
        let mut header = [0u8; 40];
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        vm_memory::Bytes::write_slice(mem, &header, GuestAddress(at)).unwrap();
    };
    // One the backend finished: its reply stays as the backend wrote it.
    request(0xaaaa, 0x3e000);
    let done = requests.add(&[(0x3e000, 40, 0), (0x3f000, 256, VRING_DESC_F_WRITE)]);
    vm_memory::Bytes::write_slice(mem, &[0xab; 16], GuestAddress(0x3f000)).unwrap();
    let used = requests.used_addr();
    vm_memory::Bytes::write_obj(mem, [u32::from(done), 16], GuestAddress(used + 4)).unwrap();
    vm_memory::Bytes::write_obj(mem, 1u16, GuestAddress(used + 2)).unwrap();
    // One it took and never finished.
    request(0x1111, 0x40000);
    let first = requests.add(&[(0x40000, 40, 0), (0x41000, 256, VRING_DESC_F_WRITE)]);
    request(0, 0x42000);
    hiprio.add(&[(0x42000, 40, 0)]);
    peer.cut();
    pump(&mut em);

    let reply = |at: u64| {
        let mut out = [0u8; 16];
        vm_memory::Bytes::read_slice(mem, &mut out, GuestAddress(at)).unwrap();
        let len = u32::from_le_bytes(out[..4].try_into().unwrap());
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..].try_into().unwrap());
        (len, error, unique)
    };
    assert_eq!(requests.used(), vec![(done, 16), (first, 16)]);
    let mut finished = [0u8; 16];
    vm_memory::Bytes::read_slice(mem, &mut finished, GuestAddress(0x3f000)).unwrap();
    assert_eq!(
        finished, [0xab; 16],
        "a finished request was answered again"
    );
    assert_eq!(reply(0x41000), (16, -libc::EIO, 0x1111));
    assert_eq!(hiprio.used().len(), 1, "the FORGET is returned");
    assert_eq!(interrupt.status() & INT_USED_RING, INT_USED_RING);

    // A request queued afterwards, with its kick (the KVM ioeventfd).
    request(0x2222, 0x43000);
    let second = requests.add(&[(0x43000, 40, 0), (0x44000, 64, VRING_DESC_F_WRITE)]);
    device.lock().unwrap().queue_events()[1].write(1).unwrap();
    crate::virtio::test_queue::assert_idle(&mut em);
    assert_eq!(requests.used(), vec![(second, 16)]);
    assert_eq!(reply(0x44000), (16, -libc::EIO, 0x2222));
}
