//! virtio-fs (device id 26): a host directory the guest mounts with
//! `mount -t virtiofs TAG DIR`, served by a vhost-user backend (virtiofsd).
//! kiln gives the device its identity and config space (the tag and the
//! number of request queues); the backend serves the FUSE requests.

use vm_memory::GuestMemoryMmap;

use super::chain::Chain;
use super::vhost_user::{VhostUserConnection, VhostUserDevice, VhostUserError};

/// virtio device id of a file system device.
pub const DEVICE_ID_FS: u32 = 26;
/// Longest tag the config space holds (bytes, no NUL needed).
pub const TAG_MAX: usize = 36;
/// Entries per queue: a FUSE request takes a few descriptors.
const QUEUE_SIZE: u16 = 256;
/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

/// Checks a tag: 1 to [`TAG_MAX`] bytes of printable ASCII without spaces
/// or commas (it also travels on the guest's kernel command line).
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > TAG_MAX {
        return Err(format!(
            "virtio-fs tag '{tag}' must be 1 to {TAG_MAX} bytes"
        ));
    }
    if !tag.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!(
            "virtio-fs tag '{tag}' must be printable ASCII without spaces or commas"
        ));
    }
    Ok(())
}

/// The config space: the tag, NUL-padded to 36 bytes, then the number of
/// request queues (le32).
fn config_space(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; TAG_MAX + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    let request_queues = (QUEUE_SIZES.len() - 1) as u32;
    config[TAG_MAX..].copy_from_slice(&request_queues.to_le_bytes());
    config
}

/// Size of a FUSE request's header (`fuse_in_header`): len, opcode,
/// unique, nodeid, uid, gid, pid, padding.
const FUSE_IN_HEADER: usize = 40;
/// Size of a FUSE reply's header (`fuse_out_header`): len, error, unique.
const FUSE_OUT_HEADER: usize = 16;

/// kiln's own answer to a FUSE request once virtiofsd is gone: a reply
/// header with EIO for the request's `unique`; nothing for a request
/// without room for a reply (FORGET) or too short to be one.
pub(crate) fn reply_eio(mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
    let mut request = [0u8; FUSE_IN_HEADER];
    if chain.reader().read_exact(mem, &mut request).is_err()
        || chain.writable_len() < FUSE_OUT_HEADER as u64
    {
        return 0;
    }
    let mut reply = [0u8; FUSE_OUT_HEADER];
    reply[..4].copy_from_slice(&(FUSE_OUT_HEADER as u32).to_le_bytes());
    reply[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
    reply[8..].copy_from_slice(&request[8..16]);
    chain.writer().write(mem, &reply) as u32
}

/// A virtio-fs device with `tag`, served by the backend of `connection`.
pub fn virtio_fs(
    tag: &str,
    connection: VhostUserConnection,
) -> Result<VhostUserDevice, VhostUserError> {
    validate_tag(tag).map_err(VhostUserError::Backend)?;
    let device = VhostUserDevice::new(
        format!("fs {tag}"),
        DEVICE_ID_FS,
        &QUEUE_SIZES,
        config_space(tag),
        connection,
    )?;
    Ok(device.with_orphan_reply(reply_eio))
}

/// Queues a virtio-fs device has (the backend must serve as many).
pub const QUEUES: usize = QUEUE_SIZES.len();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_tag_then_queue_count() {
        let config = config_space("kiln-share0");
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..11], b"kiln-share0");
        assert!(config[11..TAG_MAX].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(config[36..].try_into().unwrap()), 1);
        let longest = "t".repeat(TAG_MAX);
        assert_eq!(&config_space(&longest)[..TAG_MAX], longest.as_bytes());
    }

    #[test]
    fn tags_are_checked() {
        assert!(validate_tag("kiln-share0").is_ok());
        assert!(validate_tag(&"t".repeat(TAG_MAX)).is_ok());
        for bad in ["", "a b", "a,b", "é", &"t".repeat(TAG_MAX + 1)] {
            assert!(validate_tag(bad).is_err(), "{bad:?}");
        }
    }
}
