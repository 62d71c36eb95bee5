//! The exec spec: what kiln's init runs, handed over as `/kiln/exec`.
//!
//! Binary format (all integers little-endian), so any byte string a C string
//! can hold survives unchanged, whatever its quoting, spaces or encoding:
//!
//! ```text
//! magic "KXSP" | version u8 | record*
//! record = tag u8 | len u32 | payload[len]
//! ```
//!
//! Tags: 1 argument (repeated, in order), 2 environment entry `NAME=VALUE`
//! (repeated, in order), 3 working directory, 4 uid (u32), 5 gid (u32),
//! 6 hostname, 7 supplementary groups (u32 each, at least one), 8 rlimit
//! (resource u32, soft u64, hard u64; repeated, one per resource). New
//! fields get new tags; an incompatible change bumps the version. Decoding is strict (unknown tags, duplicates and trailing bytes
//! are errors) because both ends are built from this file.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::spawn::Credentials;
use std::ffi::CString;

/// `PATH` for commands whose spec does not set one (also where `argv[0]` is searched).
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The one variable init passes on from its own environment to every
/// command. The host may put it on the kernel command line (the kernel hands
/// such words to init as its environment), so it also binds init itself from
/// its first instruction. kiln's PVM host profile uses it to keep glibc's
/// AVX code out of the guest, whose kernel cannot preserve AVX registers
/// there (see `src/host_profile.rs`). A spec's own value is appended
/// (`platform:spec`): it can add tunables, and wins for the ones it repeats.
pub const PLATFORM_ENV: &str = "GLIBC_TUNABLES";

const MAGIC: &[u8; 4] = b"KXSP";
/// Format version written by `encode` and the only one `decode` accepts.
pub const VERSION: u8 = 1;
/// The user and group kiln's init runs a command as when its spec names
/// none: `nobody` and `nogroup`. An unprivileged command cannot open
/// `/dev/mem` (kiln's control page) nor trace, read or signal init and its
/// agent (root's processes).
pub const DEFAULT_IDS: (u32, u32) = (65534, 65534);
/// Linux's HOST_NAME_MAX.
pub const HOSTNAME_MAX: usize = 64;

/// Whether `name` is a hostname kiln gives a guest: 1 to [`HOSTNAME_MAX`]
/// bytes of ASCII letters, digits, `-` and `.`, not starting with `-` or
/// `.` (RFC 1123 characters, checked loosely: no empty-label rule).
pub fn valid_hostname(name: &[u8]) -> bool {
    (1..=HOSTNAME_MAX).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !matches!(name[0], b'-' | b'.')
}

const TAG_ARG: u8 = 1;
const TAG_ENV: u8 = 2;
const TAG_CWD: u8 = 3;
const TAG_UID: u8 = 4;
const TAG_GID: u8 = 5;
const TAG_HOSTNAME: u8 = 6;
const TAG_GROUPS: u8 = 7;
const TAG_RLIMIT: u8 = 8;

/// Most supplementary groups a spec carries (Linux's NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;
/// `RLIM_INFINITY`: no limit.
pub const RLIM_INFINITY: u64 = u64::MAX;

/// A resource limit (setrlimit(2)) by its Linux name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// `RLIMIT_CPU`: CPU seconds.
    Cpu,
    /// `RLIMIT_FSIZE`: largest file written, bytes.
    Fsize,
    /// `RLIMIT_DATA`: data segment, bytes.
    Data,
    /// `RLIMIT_STACK`: stack, bytes.
    Stack,
    /// `RLIMIT_CORE`: largest core file, bytes.
    Core,
    /// `RLIMIT_RSS`: resident set (no effect on Linux today).
    Rss,
    /// `RLIMIT_NPROC`: processes of the user.
    Nproc,
    /// `RLIMIT_NOFILE`: open file descriptors.
    Nofile,
    /// `RLIMIT_MEMLOCK`: locked memory, bytes.
    Memlock,
    /// `RLIMIT_AS`: address space, bytes.
    As,
    /// `RLIMIT_LOCKS`: file locks.
    Locks,
    /// `RLIMIT_SIGPENDING`: queued signals.
    Sigpending,
    /// `RLIMIT_MSGQUEUE`: POSIX message queue bytes.
    Msgqueue,
    /// `RLIMIT_NICE`: ceiling of the nice value.
    Nice,
    /// `RLIMIT_RTPRIO`: real-time priority ceiling.
    Rtprio,
    /// `RLIMIT_RTTIME`: real-time CPU microseconds.
    Rttime,
}

impl Resource {
    /// Every resource, in Linux's numbering (the index is the number).
    pub const ALL: [Resource; 16] = [
        Self::Cpu,
        Self::Fsize,
        Self::Data,
        Self::Stack,
        Self::Core,
        Self::Rss,
        Self::Nproc,
        Self::Nofile,
        Self::Memlock,
        Self::As,
        Self::Locks,
        Self::Sigpending,
        Self::Msgqueue,
        Self::Nice,
        Self::Rtprio,
        Self::Rttime,
    ];

    /// The resource's number on Linux (x86-64 and the generic ABI).
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The resource of a Linux number.
    pub fn from_number(n: u32) -> Option<Self> {
        Self::ALL.get(n as usize).copied()
    }

    /// The C name, e.g. `RLIMIT_NOFILE` (the name OCI's config uses).
    pub fn name(self) -> &'static str {
        [
            "RLIMIT_CPU",
            "RLIMIT_FSIZE",
            "RLIMIT_DATA",
            "RLIMIT_STACK",
            "RLIMIT_CORE",
            "RLIMIT_RSS",
            "RLIMIT_NPROC",
            "RLIMIT_NOFILE",
            "RLIMIT_MEMLOCK",
            "RLIMIT_AS",
            "RLIMIT_LOCKS",
            "RLIMIT_SIGPENDING",
            "RLIMIT_MSGQUEUE",
            "RLIMIT_NICE",
            "RLIMIT_RTPRIO",
            "RLIMIT_RTTIME",
        ][self as usize]
    }

    /// The resource of a C name (`RLIMIT_NOFILE`, as OCI's config has it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// A resource's soft and hard limits ([`RLIM_INFINITY`]: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    /// Which resource.
    pub resource: Resource,
    /// The limit the kernel enforces (at most `hard`).
    pub soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: u64,
}

/// A command to run in the guest and the process attributes to run it with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// `argv[0]` is the program (searched in `PATH` unless it contains `/`).
    pub argv: Vec<Vec<u8>>,
    /// The complete environment, in order; init adds a default `PATH` if absent.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The working directory (default: the one init runs in).
    pub cwd: Option<Vec<u8>>,
    /// The user id to run as (0 is root; default: see [`ExecSpec::ids`]).
    pub uid: Option<u32>,
    /// The group id to run as (default: see [`ExecSpec::ids`]).
    pub gid: Option<u32>,
    /// Guest hostname; init uses "kiln" if unset.
    pub hostname: Option<Vec<u8>>,
    /// Supplementary groups, at most [`MAX_GROUPS`]. Run as another user
    /// than init's (root), the command has exactly these (none by
    /// default: init's own are dropped).
    pub groups: Vec<u32>,
    /// Resource limits set before the command's ids change (so a hard limit
    /// may be raised), one per resource, soft at most hard.
    pub rlimits: Vec<Rlimit>,
}

/// Why a spec cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// The input does not start with the spec's magic bytes.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion(u8),
    /// The input ends inside a record.
    Truncated,
    /// A record tag this build does not know.
    UnknownTag(u8),
    /// A field that may appear once appears twice (its name).
    Duplicate(&'static str),
    /// A fixed-size field (uid, gid) has the wrong payload length.
    BadLength(&'static str),
    /// No program: `argv` is empty.
    EmptyArgv,
    /// A NUL byte, which no C string (argv, environ, path) can carry.
    Nul(&'static str),
    /// An environment name that is empty or contains `=`.
    BadEnvName(Vec<u8>),
    /// Not a valid hostname (see [`valid_hostname`]).
    BadHostname,
    /// An empty working directory.
    EmptyCwd,
    /// More than [`MAX_GROUPS`] supplementary groups.
    TooManyGroups,
    /// A resource limit number Linux does not have.
    UnknownResource(u32),
    /// A soft limit above its hard limit (the resource's name).
    SoftAboveHard(&'static str),
    /// A field longer than the format's u32 length.
    TooLong(&'static str),
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => write!(f, "not an exec spec (bad magic)"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported exec spec version {v}"),
            Self::Truncated => write!(f, "exec spec is truncated"),
            Self::UnknownTag(t) => write!(f, "unknown exec spec field tag {t}"),
            Self::Duplicate(n) => write!(f, "exec spec field '{n}' given twice"),
            Self::BadLength(n) => write!(f, "exec spec field '{n}' has a bad length"),
            Self::EmptyArgv => write!(f, "no command given"),
            Self::Nul(n) => write!(f, "{n} contains a NUL byte"),
            Self::BadEnvName(k) => write!(
                f,
                "invalid environment variable name '{}'",
                String::from_utf8_lossy(k)
            ),
            Self::BadHostname => write!(
                f,
                "hostname must be 1 to {HOSTNAME_MAX} letters, digits, '-' or '.' (not first)"
            ),
            Self::EmptyCwd => write!(f, "working directory is empty"),
            Self::TooManyGroups => write!(f, "more than {MAX_GROUPS} supplementary groups"),
            Self::UnknownResource(n) => write!(f, "unknown resource limit number {n}"),
            Self::SoftAboveHard(r) => write!(f, "{r}: soft limit above the hard limit"),
            Self::TooLong(n) => write!(f, "{n} is too long"),
        }
    }
}

impl std::error::Error for SpecError {}

impl ExecSpec {
    /// The process to start: the spec's environment only (plus a default
    /// `PATH` and init's [`PLATFORM_ENV`]), its working directory and ids
    /// (`default_ids` when it names none: see [`ExecSpec::ids`]). Callers
    /// add stdio.
    pub fn to_command(&self, default_ids: Option<(u32, u32)>) -> Command {
        self.to_command_with(std::env::var_os(PLATFORM_ENV), default_ids)
    }

    /// `to_command` with init's [`PLATFORM_ENV`] value given.
    pub fn to_command_with(
        &self,
        platform: Option<OsString>,
        default_ids: Option<(u32, u32)>,
    ) -> Command {
        let os = OsStr::from_bytes;
        let mut cmd = Command::new(os(&self.argv[0]));
        cmd.args(self.argv[1..].iter().map(|a| os(a))).env_clear();
        cmd.envs(self.environment(platform));
        // Groups, limits, ids, directory, in that order (see
        // `Credentials::apply`), all in the child before exec: std's own
        // uid/gid would run before a `pre_exec` hook, too late for groups
        // and raised hard limits.
        // SAFETY: plain syscall without arguments.
        let root = unsafe { libc::getuid() } == 0;
        let creds = Credentials::new(self, default_ids, root);
        let cwd = self.cwd.as_deref().map(|c| CString::new(c).ok());
        // SAFETY: the hook only makes raw system calls on data prepared
        // here (no allocation, no locks), as a forked child may.
        unsafe {
            cmd.pre_exec(move || {
                let fail = std::io::Error::from_raw_os_error;
                creds.apply().map_err(fail)?;
                match &cwd {
                    Some(Some(dir)) if libc::syscall(libc::SYS_chdir, dir.as_ptr()) < 0 => {
                        return Err(std::io::Error::last_os_error())
                    }
                    // `validate` refuses a NUL: never here.
                    Some(None) => return Err(fail(libc::EINVAL)),
                    _ => {}
                }
                Ok(())
            });
        }
        cmd
    }

    /// The command's whole environment: the spec's entries (a name given
    /// twice keeps its last value), `PATH` = [`DEFAULT_PATH`] unless the
    /// spec sets one, and init's [`PLATFORM_ENV`] value (`platform`), to
    /// which the spec's own value is appended (`platform:spec`): it can add
    /// tunables, and wins for the ones it repeats.
    pub fn environment(&self, platform: Option<OsString>) -> BTreeMap<OsString, OsString> {
        let os = |b: &[u8]| OsStr::from_bytes(b).to_owned();
        let mut env: BTreeMap<OsString, OsString> =
            self.env.iter().map(|(k, v)| (os(k), os(v))).collect();
        env.entry("PATH".into()).or_insert_with(|| os(DEFAULT_PATH));
        if let Some(mut value) = platform.filter(|v| !v.is_empty()) {
            if let Some(v) = env.get(OsStr::new(PLATFORM_ENV)).filter(|v| !v.is_empty()) {
                value.push(":");
                value.push(v);
            }
            env.insert(PLATFORM_ENV.into(), value);
        }
        env
    }

    /// The user and group the command runs as (`None`: the caller's own):
    /// the spec's; a uid given alone brings the group of the same number
    /// (uid 0 alone is root:root); a spec that names neither takes
    /// `default_ids` (kiln's init passes [`DEFAULT_IDS`]).
    pub fn ids(&self, default_ids: Option<(u32, u32)>) -> (Option<u32>, Option<u32>) {
        let uid = self.uid.or(default_ids.map(|(uid, _)| uid));
        let gid = self.gid.or(match self.uid {
            Some(uid) => Some(uid),
            None => default_ids.map(|(_, gid)| gid),
        });
        (uid, gid)
    }

    /// A spec running `argv` with an empty environment and default attributes.
    pub fn new<I, A>(argv: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<Vec<u8>>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Checks what the guest could not represent: NULs, bad names, empty argv.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::EmptyArgv);
        }
        let no_nul = |b: &[u8], what| match b.contains(&0) {
            true => Err(SpecError::Nul(what)),
            false => Ok(()),
        };
        for a in &self.argv {
            no_nul(a, "an argument")?;
        }
        for (k, v) in &self.env {
            no_nul(k, "an environment variable name")?;
            no_nul(v, "an environment variable value")?;
            if k.is_empty() || k.contains(&b'=') {
                return Err(SpecError::BadEnvName(k.clone()));
            }
        }
        if let Some(cwd) = &self.cwd {
            no_nul(cwd, "the working directory")?;
            if cwd.is_empty() {
                return Err(SpecError::EmptyCwd);
            }
        }
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(SpecError::BadHostname);
            }
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(SpecError::TooManyGroups);
        }
        for (i, limit) in self.rlimits.iter().enumerate() {
            if limit.soft > limit.hard {
                return Err(SpecError::SoftAboveHard(limit.resource.name()));
            }
            if self.rlimits[..i]
                .iter()
                .any(|l| l.resource == limit.resource)
            {
                return Err(SpecError::Duplicate(limit.resource.name()));
            }
        }
        Ok(())
    }

    /// Serializes the spec, refusing anything `validate` rejects.
    pub fn encode(&self) -> Result<Vec<u8>, SpecError> {
        self.validate()?;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let mut put = |tag: u8, parts: &[&[u8]], what| -> Result<(), SpecError> {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            let len = u32::try_from(len).map_err(|_| SpecError::TooLong(what))?;
            out.push(tag);
            out.extend_from_slice(&len.to_le_bytes());
            parts.iter().for_each(|p| out.extend_from_slice(p));
            Ok(())
        };
        for a in &self.argv {
            put(TAG_ARG, &[a], "an argument")?;
        }
        for (k, v) in &self.env {
            put(TAG_ENV, &[k, b"=", v], "an environment variable")?;
        }
        if let Some(cwd) = &self.cwd {
            put(TAG_CWD, &[cwd], "the working directory")?;
        }
        if let Some(uid) = self.uid {
            put(TAG_UID, &[&uid.to_le_bytes()], "uid")?;
        }
        if let Some(gid) = self.gid {
            put(TAG_GID, &[&gid.to_le_bytes()], "gid")?;
        }
        if let Some(h) = &self.hostname {
            put(TAG_HOSTNAME, &[h], "the hostname")?;
        }
        if !self.groups.is_empty() {
            let groups: Vec<u8> = self.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
            put(TAG_GROUPS, &[&groups], "the groups")?;
        }
        for l in &self.rlimits {
            let number = l.resource.number().to_le_bytes();
            let (soft, hard) = (l.soft.to_le_bytes(), l.hard.to_le_bytes());
            put(TAG_RLIMIT, &[&number, &soft, &hard], "an rlimit")?;
        }
        Ok(out)
    }

    /// Parses and validates an encoded spec; never panics on bad input.
    pub fn decode(mut buf: &[u8]) -> Result<Self, SpecError> {
        let rest = buf.strip_prefix(MAGIC).ok_or(SpecError::BadMagic)?;
        let (&version, rest) = rest.split_first().ok_or(SpecError::Truncated)?;
        if version != VERSION {
            return Err(SpecError::UnsupportedVersion(version));
        }
        buf = rest;
        let mut spec = Self::default();
        while let Some((&tag, rest)) = buf.split_first() {
            let len = rest.get(..4).ok_or(SpecError::Truncated)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let body = &rest[4..];
            let payload = body.get(..len).ok_or(SpecError::Truncated)?;
            buf = &body[len..];
            match tag {
                TAG_ARG => spec.argv.push(payload.to_vec()),
                TAG_ENV => {
                    // Names cannot contain '=', so the first one splits.
                    let eq = payload.iter().position(|&b| b == b'=');
                    let eq = eq.ok_or_else(|| SpecError::BadEnvName(payload.to_vec()))?;
                    let (k, v) = (&payload[..eq], &payload[eq + 1..]);
                    spec.env.push((k.to_vec(), v.to_vec()));
                }
                TAG_CWD => set_once(&mut spec.cwd, payload.to_vec(), "cwd")?,
                TAG_UID => set_once(&mut spec.uid, read_u32(payload, "uid")?, "uid")?,
                TAG_GID => set_once(&mut spec.gid, read_u32(payload, "gid")?, "gid")?,
                TAG_HOSTNAME => set_once(&mut spec.hostname, payload.to_vec(), "hostname")?,
                TAG_GROUPS => {
                    // Checked before anything is allocated; an empty record
                    // is never written.
                    if !spec.groups.is_empty() {
                        return Err(SpecError::Duplicate("groups"));
                    }
                    if payload.is_empty() || payload.len() % 4 != 0 {
                        return Err(SpecError::BadLength("groups"));
                    }
                    if payload.len() / 4 > MAX_GROUPS {
                        return Err(SpecError::TooManyGroups);
                    }
                    spec.groups = payload
                        .chunks_exact(4)
                        .map(|g| u32::from_le_bytes([g[0], g[1], g[2], g[3]]))
                        .collect();
                }
                TAG_RLIMIT => {
                    let b: &[u8; 20] = payload
                        .try_into()
                        .map_err(|_| SpecError::BadLength("rlimit"))?;
                    let number = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    let resource =
                        Resource::from_number(number).ok_or(SpecError::UnknownResource(number))?;
                    let u64_at =
                        |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                    // One record per resource: the list stays at most
                    // `Resource::ALL` long.
                    if spec.rlimits.iter().any(|l| l.resource == resource) {
                        return Err(SpecError::Duplicate(resource.name()));
                    }
                    spec.rlimits.push(Rlimit {
                        resource,
                        soft: u64_at(4),
                        hard: u64_at(12),
                    });
                }
                t => return Err(SpecError::UnknownTag(t)),
            }
        }
        spec.validate()?;
        Ok(spec)
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), SpecError> {
    match slot.replace(value) {
        Some(_) => Err(SpecError::Duplicate(name)),
        None => Ok(()),
    }
}

fn read_u32(payload: &[u8], name: &'static str) -> Result<u32, SpecError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| SpecError::BadLength(name))?;
    Ok(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn awkward() -> ExecSpec {
        ExecSpec {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                b"echo \"a b\" 'c'\n$HOME \\ `x`".to_vec(),
                b"".to_vec(),
                vec![0xff, 0xfe, b' ', 0x80, b'\t', b'\r'],
                "ünïcødé ✓".into(),
                vec![b'x'; 100_000],
            ],
            env: vec![
                (b"A".to_vec(), b"x=y=z".to_vec()),
                (b"EMPTY".to_vec(), Vec::new()),
                (b"BIN".to_vec(), vec![0xc3, 0x28, b'\n']),
            ],
            cwd: Some(b"/tmp/dir with space".to_vec()),
            uid: Some(1000),
            gid: Some(u32::MAX),
            hostname: Some(b"guest-1".to_vec()),
            groups: vec![0, 4242, u32::MAX],
            rlimits: vec![
                Rlimit {
                    resource: Resource::Core,
                    soft: 1234,
                    hard: 5678,
                },
                Rlimit {
                    resource: Resource::Rttime,
                    soft: 0,
                    hard: RLIM_INFINITY,
                },
            ],
        }
    }

    #[test]
    fn resources_have_their_linux_numbers_and_names() {
        assert_eq!(Resource::Core.number(), libc::RLIMIT_CORE);
        assert_eq!(Resource::Nproc.number(), libc::RLIMIT_NPROC as u32);
        assert_eq!(Resource::Nofile.number(), libc::RLIMIT_NOFILE as u32);
        assert_eq!(Resource::Rttime.number(), libc::RLIMIT_RTTIME as u32);
        for (n, r) in Resource::ALL.into_iter().enumerate() {
            assert_eq!(Resource::from_number(n as u32), Some(r));
            assert_eq!(Resource::from_name(r.name()), Some(r));
        }
        assert_eq!(Resource::from_number(16), None);
        assert_eq!(Resource::from_name("RLIMIT_NOPE"), None);
        assert_eq!(Resource::from_name("nofile"), None);
    }

    #[test]
    fn groups_and_limits_are_bounded_and_checked() {
        let mut s = ExecSpec::new(["true"]);
        s.groups = vec![1; MAX_GROUPS];
        assert_eq!(s.validate(), Ok(()));
        s.groups.push(1);
        assert_eq!(s.encode(), Err(SpecError::TooManyGroups));
        s.groups.clear();
        let core = |soft, hard| Rlimit {
            resource: Resource::Core,
            soft,
            hard,
        };
        s.rlimits = vec![core(2, 1)];
        assert_eq!(s.encode(), Err(SpecError::SoftAboveHard("RLIMIT_CORE")));
        s.rlimits = vec![core(1, 2), core(1, 2)];
        assert_eq!(s.encode(), Err(SpecError::Duplicate("RLIMIT_CORE")));
        assert_eq!(
            SpecError::SoftAboveHard("RLIMIT_CORE").to_string(),
            "RLIMIT_CORE: soft limit above the hard limit"
        );
    }

    fn env_of(cmd: &Command, name: &str) -> Option<Option<OsString>> {
        cmd.get_envs()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.map(OsStr::to_owned))
    }

    #[test]
    fn ids_default_to_the_given_user_and_a_lone_uid_brings_its_group() {
        let ids = |uid, gid, default| {
            let spec = ExecSpec {
                uid,
                gid,
                ..ExecSpec::new(["id"])
            };
            spec.ids(default)
        };
        let nobody = Some(DEFAULT_IDS);
        assert_eq!(ids(None, None, nobody), (Some(65534), Some(65534)));
        assert_eq!(ids(None, None, None), (None, None), "the caller's own");
        assert_eq!(ids(Some(0), None, nobody), (Some(0), Some(0)));
        assert_eq!(ids(Some(7), None, nobody), (Some(7), Some(7)));
        assert_eq!(ids(Some(7), Some(8), nobody), (Some(7), Some(8)));
        assert_eq!(ids(None, Some(8), nobody), (Some(65534), Some(8)));
    }

    #[test]
    fn init_passes_its_platform_variable_on() {
        let platform = || Some(OsString::from("glibc.cpu.hwcaps=-AVX2"));
        let mut spec = ExecSpec::new(["prog"]);
        spec.env.push((b"A".to_vec(), b"1".to_vec()));
        let cmd = spec.to_command_with(platform(), None);
        assert_eq!(
            env_of(&cmd, PLATFORM_ENV),
            Some(Some("glibc.cpu.hwcaps=-AVX2".into()))
        );
        assert_eq!(env_of(&cmd, "A"), Some(Some("1".into())));
        // The spec's own value comes after the platform's (its last entry).
        spec.env
            .push((PLATFORM_ENV.into(), b"glibc.malloc.check=1".to_vec()));
        spec.env
            .push((PLATFORM_ENV.into(), b"glibc.malloc.check=3".to_vec()));
        assert_eq!(
            env_of(&spec.to_command_with(platform(), None), PLATFORM_ENV),
            Some(Some("glibc.cpu.hwcaps=-AVX2:glibc.malloc.check=3".into()))
        );
        // Without a platform value (hardware KVM, or the agent run on a
        // host) the spec's environment is untouched.
        assert_eq!(
            env_of(&spec.to_command_with(None, None), PLATFORM_ENV),
            Some(Some("glibc.malloc.check=3".into()))
        );
        let plain = ExecSpec::new(["prog"]);
        assert_eq!(
            env_of(&plain.to_command_with(None, None), PLATFORM_ENV),
            None
        );
        assert_eq!(
            env_of(
                &plain.to_command_with(Some(OsString::new()), None),
                PLATFORM_ENV
            ),
            None
        );
    }

    #[test]
    fn path_defaults_unless_the_spec_sets_it() {
        let plain = ExecSpec::new(["prog"]);
        let path = |cmd: &Command| env_of(cmd, "PATH").flatten();
        assert_eq!(
            path(&plain.to_command_with(None, None)),
            Some(OsStr::from_bytes(DEFAULT_PATH).to_owned())
        );
        let mut own = ExecSpec::new(["prog"]);
        own.env.push((b"PATH".to_vec(), b"/opt/bin".to_vec()));
        assert_eq!(
            path(&own.to_command_with(None, None)),
            Some("/opt/bin".into())
        );
    }

    #[test]
    fn hostnames_are_1_to_64_bytes() {
        let with = |h: &[u8]| {
            let mut spec = ExecSpec::new(["prog"]);
            spec.hostname = Some(h.to_vec());
            spec.validate()
        };
        assert_eq!(with(&[b'h'; 64]), Ok(()));
        assert_eq!(with(b"copy-1.test"), Ok(()));
        for bad in [
            &[b'h'; 65][..],
            b"",
            b"-x",
            b".x",
            b"a b",
            b"a\0b",
            b"a/b",
            b"\xc3\xa9",
        ] {
            assert_eq!(with(bad), Err(SpecError::BadHostname), "{bad:?}");
        }
        assert_eq!(
            SpecError::BadHostname.to_string(),
            "hostname must be 1 to 64 letters, digits, '-' or '.' (not first)"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (e, text) in [
            (SpecError::BadMagic, "not an exec spec (bad magic)"),
            (
                SpecError::UnsupportedVersion(9),
                "unsupported exec spec version 9",
            ),
            (SpecError::Truncated, "exec spec is truncated"),
            (SpecError::UnknownTag(7), "unknown exec spec field tag 7"),
            (
                SpecError::Duplicate("cwd"),
                "exec spec field 'cwd' given twice",
            ),
            (
                SpecError::BadLength("uid"),
                "exec spec field 'uid' has a bad length",
            ),
            (SpecError::EmptyArgv, "no command given"),
            (
                SpecError::Nul("an argument"),
                "an argument contains a NUL byte",
            ),
            (
                SpecError::BadEnvName(b"A=B".to_vec()),
                "invalid environment variable name 'A=B'",
            ),
            (SpecError::EmptyCwd, "working directory is empty"),
            (SpecError::TooLong("an argument"), "an argument is too long"),
        ] {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn round_trips_awkward_arguments() {
        let spec = awkward();
        assert_eq!(ExecSpec::decode(&spec.encode().unwrap()).unwrap(), spec);
        let minimal = ExecSpec::new(["true"]);
        assert_eq!(
            ExecSpec::decode(&minimal.encode().unwrap()).unwrap(),
            minimal
        );
    }

    #[test]
    fn rejects_unrepresentable_specs_at_encode() {
        let mut s = ExecSpec::new([&b"a\0b"[..]]);
        assert_eq!(s.encode(), Err(SpecError::Nul("an argument")));
        s.argv.clear();
        assert_eq!(s.encode(), Err(SpecError::EmptyArgv));
        let mut s = ExecSpec::new(["true"]);
        s.env.push((b"A=B".to_vec(), b"c".to_vec()));
        assert!(matches!(s.encode(), Err(SpecError::BadEnvName(_))));
        s.env = vec![(b"A".to_vec(), b"c\0".to_vec())];
        assert!(matches!(s.encode(), Err(SpecError::Nul(_))));
        s.env.clear();
        s.hostname = Some(vec![b'h'; 65]);
        assert_eq!(s.encode(), Err(SpecError::BadHostname));
        s.hostname = None;
        s.cwd = Some(Vec::new());
        assert_eq!(s.encode(), Err(SpecError::EmptyCwd));
    }

    #[test]
    fn rejects_malformed_input() {
        let good = awkward().encode().unwrap();
        // A prefix decodes only if it ends between records (and is then
        // exactly that shorter spec); otherwise it is an error, not a panic.
        for n in 0..good.len() {
            if let Ok(spec) = ExecSpec::decode(&good[..n]) {
                assert_eq!(spec.encode().unwrap(), &good[..n], "prefix {n}");
            }
        }
        assert_eq!(
            ExecSpec::decode(&good[..good.len() - 1]),
            Err(SpecError::Truncated)
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(ExecSpec::decode(&bad), Err(SpecError::BadMagic));
        bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            ExecSpec::decode(&bad),
            Err(SpecError::UnsupportedVersion(2))
        );
        // Trailing garbage is an unknown or truncated record.
        bad = good.clone();
        bad.push(99);
        assert_eq!(ExecSpec::decode(&bad), Err(SpecError::Truncated));
        bad.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(ExecSpec::decode(&bad), Err(SpecError::UnknownTag(99)));
        // A huge length must not allocate or panic.
        let mut huge = b"KXSP\x01\x01".to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ExecSpec::decode(&huge), Err(SpecError::Truncated));
        // Duplicates, bad sizes, NULs and '='-less env entries.
        let rec = |tag: u8, p: &[u8]| {
            let mut r = vec![tag];
            r.extend_from_slice(&(p.len() as u32).to_le_bytes());
            r.extend_from_slice(p);
            r
        };
        let with = |recs: &[Vec<u8>]| {
            let mut b = b"KXSP\x01".to_vec();
            b.extend(rec(TAG_ARG, b"true"));
            recs.iter().for_each(|r| b.extend_from_slice(r));
            ExecSpec::decode(&b)
        };
        assert!(with(&[]).is_ok());
        let uid = rec(TAG_UID, &[1, 0, 0, 0]);
        assert_eq!(with(&[uid.clone(), uid]), Err(SpecError::Duplicate("uid")));
        assert_eq!(
            with(&[rec(TAG_GID, &[1, 0])]),
            Err(SpecError::BadLength("gid"))
        );
        assert!(matches!(
            with(&[rec(TAG_ARG, b"a\0")]),
            Err(SpecError::Nul(_))
        ));
        assert!(matches!(
            with(&[rec(TAG_ENV, b"NOEQ")]),
            Err(SpecError::BadEnvName(_))
        ));
        assert!(matches!(
            with(&[rec(TAG_ENV, b"=v")]),
            Err(SpecError::BadEnvName(_))
        ));
        assert_eq!(with(&[rec(TAG_HOSTNAME, b"")]), Err(SpecError::BadHostname));
        // Groups: whole u32s, at least one, at most MAX_GROUPS, once.
        for bad in [&[][..], &[1, 0, 0]] {
            assert_eq!(
                with(&[rec(TAG_GROUPS, bad)]),
                Err(SpecError::BadLength("groups"))
            );
        }
        let groups = rec(TAG_GROUPS, &[7, 0, 0, 0]);
        assert_eq!(with(&[groups.clone()]).unwrap().groups, [7]);
        assert_eq!(
            with(&[groups.clone(), groups]),
            Err(SpecError::Duplicate("groups"))
        );
        assert_eq!(
            with(&[rec(TAG_GROUPS, &vec![0; 4 * (MAX_GROUPS + 1)])]),
            Err(SpecError::TooManyGroups)
        );
        // Limits: 20 bytes, a known resource, soft <= hard, once each.
        let limit = |n: u32, soft: u64, hard: u64| {
            let p: Vec<u8> = [
                &n.to_le_bytes()[..],
                &soft.to_le_bytes(),
                &hard.to_le_bytes(),
            ]
            .concat();
            rec(TAG_RLIMIT, &p)
        };
        assert_eq!(
            with(&[limit(4, 1, 2)]).unwrap().rlimits,
            [Rlimit {
                resource: Resource::Core,
                soft: 1,
                hard: 2
            }]
        );
        assert_eq!(
            with(&[rec(TAG_RLIMIT, &[4, 0, 0, 0])]),
            Err(SpecError::BadLength("rlimit"))
        );
        assert_eq!(
            with(&[limit(16, 1, 2)]),
            Err(SpecError::UnknownResource(16))
        );
        assert_eq!(
            with(&[limit(4, 3, 2)]),
            Err(SpecError::SoftAboveHard("RLIMIT_CORE"))
        );
        assert_eq!(
            with(&[limit(4, 1, 2), limit(4, 1, 2)]),
            Err(SpecError::Duplicate("RLIMIT_CORE"))
        );
        assert_eq!(
            ExecSpec::decode(b"KXSP\x01"),
            Err(SpecError::EmptyArgv),
            "argv is required"
        );
    }
}
