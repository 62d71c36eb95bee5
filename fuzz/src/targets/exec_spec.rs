//! The exec spec decoder (`kiln_init::spec::ExecSpec::decode`), which
//! kiln's init runs on whatever `/kiln/exec` holds. Beyond the bounds every
//! target has: what it accepts is valid, encodes, and decodes back to
//! itself; it allocates no more than the input's size (plus overhead).

use kiln_init::spec::{ExecSpec, Resource, Rlimit};

use crate::Target;

pub const TARGET: Target = Target {
    name: "exec_spec",
    run,
    // Per input byte, for the spec and its round trip: the smallest record
    // (an env entry) decodes to one (name, value) pair, in a vector up to
    // twice as large as it holds (the spec's), or three times while it
    // grows (the round trip's: old and new buffers both live); the bytes
    // copied out twice, and the re-encoding.
    memory_cap: 64 << 10,
    memory_per_input_byte: 5 * ENV_ENTRY / MIN_ENV_RECORD + 3,
    seeds,
};

/// The smallest env record: a tag, a length and the `=` of `NAME=VALUE`.
const MIN_ENV_RECORD: usize = 1 + 4 + 1;
/// What one decodes to.
const ENV_ENTRY: usize = std::mem::size_of::<(Vec<u8>, Vec<u8>)>();

fn run(data: &[u8]) {
    let Ok(spec) = ExecSpec::decode(data) else {
        return;
    };
    spec.validate().expect("a decoded spec is valid");
    let encoded = spec.encode().expect("a decoded spec encodes");
    assert_eq!(
        ExecSpec::decode(&encoded).as_ref(),
        Ok(&spec),
        "a spec does not survive encoding"
    );
    // The same records, maybe in another order: the same length.
    assert_eq!(
        encoded.len(),
        data.len(),
        "re-encoding changed the spec's size"
    );
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut full = ExecSpec::new(["/bin/sh", "-c", "echo \"$HOME\" 'a b'"]);
    full.env = vec![
        (b"HOME".to_vec(), b"/root".to_vec()),
        (b"X".to_vec(), b"=y=".to_vec()),
    ];
    full.cwd = Some(b"/tmp".to_vec());
    full.uid = Some(1000);
    full.gid = Some(1000);
    full.hostname = Some(b"kiln".to_vec());
    full.groups = vec![4242, 10];
    full.rlimits = vec![Rlimit {
        resource: Resource::Core,
        soft: 1234,
        hard: 5678,
    }];
    let minimal = ExecSpec::new(["true"]);
    vec![
        ("full", full.encode().expect("valid")),
        ("minimal", minimal.encode().expect("valid")),
    ]
}
