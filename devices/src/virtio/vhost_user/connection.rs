//! kiln's side of one vhost-user connection (the frontend): the messages
//! that set a backend up and tear its rings down, in the order the
//! vhost-user specification gives, over the rust-vmm `vhost` crate's
//! message codec. Nothing here knows which device the backend serves.
//!
//! The set-up ([`VhostUserConnection::new`], before the guest runs) is
//! given at most [`REPLY_TIMEOUT`]: a backend that does not answer fails it
//! instead of holding kiln. Starting and stopping the rings later (on the
//! vCPU thread that writes the device status) waits for the backend's
//! answers without a limit: kiln's own daemon answers them at once, and
//! its death ends the wait (the socket closes).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Feature bit of a backend that speaks protocol features
/// (VHOST_USER_F_PROTOCOL_FEATURES): a vhost-user bit, never offered to
/// the guest.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// How long kiln waits for a backend's set-up.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol features kiln uses when the backend has them: an answer
/// to every message (errors are seen where they happen) and the queue
/// count.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
}

/// Why a vhost-user backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// A message failed: the backend refused it, answered wrongly, closed
    /// the connection.
    #[error("vhost-user {step}: {source}")]
    Message {
        /// The message (or step) that failed.
        step: &'static str,
        /// What the codec saw.
        source: vhost::Error,
    },
    /// The backend cannot serve this device.
    #[error("vhost-user backend: {0}")]
    Backend(String),
    /// A socket option could not be set.
    #[error("vhost-user socket: {0}")]
    Socket(std::io::Error),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Message { step, source }
}

/// A connected and set-up vhost-user backend (SET_OWNER sent, features and
/// protocol features read), ready to run rings.
pub struct VhostUserConnection {
    frontend: Frontend,
    /// The backend's virtio features (its vhost-user bit included).
    backend_features: u64,
    /// Whether protocol features were negotiated (rings then start
    /// disabled and need SET_VRING_ENABLE).
    protocol: bool,
    /// The raw descriptor of the socket, watched for hang-up.
    socket_fd: std::os::fd::RawFd,
}

impl VhostUserConnection {
    /// Sets up the backend at the other end of `stream` for a device of
    /// `queues` queues: SET_OWNER, GET_FEATURES, and with protocol features
    /// GET/SET_PROTOCOL_FEATURES and GET_QUEUE_NUM (the backend must have
    /// `queues`).
    pub fn new(stream: UnixStream, queues: usize) -> Result<Self, VhostUserError> {
        Self::with_reply_timeout(stream, queues, REPLY_TIMEOUT)
    }

    /// As [`new`](Self::new), the whole set-up given at most `timeout`.
    ///
    /// The codec retries a receive that timed out, so a socket timeout
    /// would not end the wait: a watchdog thread shuts the socket down
    /// instead when the time is up, which fails the pending receive.
    pub fn with_reply_timeout(
        stream: UnixStream,
        queues: usize,
        timeout: Duration,
    ) -> Result<Self, VhostUserError> {
        let watched = stream.try_clone().map_err(VhostUserError::Socket)?;
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::Builder::new()
            .name("kiln-vhost-setup".into())
            .spawn(move || {
                let expired = cancelled.recv_timeout(timeout)
                    == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
                if expired {
                    let _ = watched.shutdown(std::net::Shutdown::Both);
                }
                expired
            })
            .map_err(VhostUserError::Socket)?;
        let set_up = Self::set_up(stream, queues);
        drop(cancel);
        match watchdog.join() {
            Ok(false) => set_up,
            _ => Err(VhostUserError::Backend(format!(
                "it did not answer within {} s",
                timeout.as_secs_f64()
            ))),
        }
    }

    fn set_up(stream: UnixStream, queues: usize) -> Result<Self, VhostUserError> {
        let socket_fd = stream.as_raw_fd();
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let protocol = backend_features & PROTOCOL_FEATURES != 0;
        if protocol {
            let theirs = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let ours = theirs & wanted_protocol_features();
            frontend
                .set_protocol_features(ours)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if ours.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Each message is answered: a refusal fails the message
                // that caused it, and the backend has applied it on return.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if ours.contains(VhostUserProtocolFeatures::MQ) {
                let have = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if have < queues as u64 {
                    return Err(VhostUserError::Backend(format!(
                        "it has {have} queues, the device needs {queues}"
                    )));
                }
            }
        }
        Ok(Self {
            frontend,
            backend_features,
            protocol,
            socket_fd,
        })
    }

    /// The virtio features the backend offers, without vhost-user's own bit.
    pub fn features(&self) -> u64 {
        self.backend_features & !PROTOCOL_FEATURES
    }

    /// The socket's descriptor (valid while `self` lives), to watch for
    /// the backend hanging up.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.socket_fd
    }

    /// Starts the backend on `queues` (each ready, rings inside `mem`):
    /// SET_FEATURES (the driver's `features`), SET_MEM_TABLE (every region
    /// of `mem`, each must be file-backed), then per queue SET_VRING_NUM,
    /// SET_VRING_ADDR (host addresses), SET_VRING_BASE, SET_VRING_CALL,
    /// SET_VRING_KICK and, with protocol features, SET_VRING_ENABLE.
    pub fn start(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), VhostUserError> {
        let vhost_bits = self.backend_features & PROTOCOL_FEATURES;
        self.frontend
            .set_features(features | vhost_bits)
            .map_err(step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                    VhostUserError::Backend(format!(
                        "guest memory at {:#x} is not file-backed and cannot be shared",
                        region.start_addr().0
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for (index, ((queue, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            let host = |addr: u64| -> Result<u64, VhostUserError> {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| {
                        VhostUserError::Backend(format!(
                            "queue {index}: ring at {addr:#x} is outside guest memory"
                        ))
                    })
            };
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &rings)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(step("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's first `queues` rings (driver reset):
    /// GET_VRING_BASE on each, which the backend answers once the ring has
    /// stopped.
    pub fn stop(&mut self, queues: usize) -> Result<(), VhostUserError> {
        for index in 0..queues {
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(step("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}
