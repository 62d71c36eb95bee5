//! virtio-rng: chains of any shape from a hostile driver; the device fills
//! at most `MAX_BYTES_PER_CHAIN` of each, whatever the chain claims.

use kiln_devices::fuzzing::RNG_MAX_BYTES_PER_CHAIN as MAX_BYTES_PER_CHAIN;
use kiln_devices::virtio::rng::Rng;

use crate::input::{Input, Script};
use crate::virtio::{Harness, RingScript, BUFFERS, RING_OPS};
use crate::Target;

pub const TARGET: Target = Target {
    name: "rng",
    run,
    // The device's scratch buffer, parsed chains (a ring of segments) and
    // the event loop; nothing grows with the guest's requests.
    memory_cap: MAX_BYTES_PER_CHAIN + (256 << 10),
    memory_per_input_byte: 0,
    seeds,
};

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut h = Harness::new(Rng::new().expect("eventfd"));
    while !input.is_empty() {
        let op = input.u8() % RING_OPS;
        h.ring_op(op, &mut input);
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let q = 0;
    let linux = Script::new()
        .activate(1, 64, u64::MAX)
        // Linux's hwrng read: one writable buffer of 64 bytes.
        .chain(q, &[(BUFFERS, 64, true)])
        .kick(q)
        .build();
    let odd = Script::new()
        .activate(1, 8, 0)
        // A readable buffer first (skipped), a buffer larger than the
        // per-chain limit, and one running into the memory hole.
        .chain(
            q,
            &[
                (BUFFERS, 16, false),
                (BUFFERS + 0x1000, 0x2_0000, true),
                (0xf_f000, 0x2000, true),
            ],
        )
        .kick(q)
        .build();
    vec![("linux-read", linux), ("odd-chain", odd)]
}
