//! The bundle's config.json (the OCI runtime spec), the part of it a VM
//! uses, and what it becomes: the VM's root and shares, and the guest
//! command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::FileMount;
use super::hooks::HooksSpec;
use super::resources::ResourcesSpec;
use crate::config::{ShareCache, ShareConfig, TmpfsConfig};
use crate::sandbox::{Command, Resource};

/// The OCI versions whose config.json kiln-oci reads (major.minor).
const SUPPORTED_VERSIONS: [&str; 2] = ["1.0", "1.1"];

/// config.json, the fields kiln-oci reads (others are ignored, as runc
/// ignores what it does not know).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The spec's version.
    pub oci_version: String,
    /// The command.
    pub process: Option<ProcessSpec>,
    /// The root file system.
    pub root: Option<RootSpec>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// Mounts, in order.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Annotations (reported by `state`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `linux` (its namespaces).
    pub linux: Option<LinuxSpec>,
    /// Hooks (`hooks`: which are run).
    #[serde(default)]
    pub hooks: HooksSpec,
}

/// `linux`, the part kiln-oci reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LinuxSpec {
    /// The namespaces the container joins or gets.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// Resource limits: the VM's size (see `resources`).
    pub resources: Option<ResourcesSpec>,
}

/// `linux.namespaces[]`.
#[derive(Clone, Debug, Deserialize)]
pub struct NamespaceSpec {
    /// network, mount, pid, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// An existing namespace to join (the engine's); none: a new one.
    pub path: Option<PathBuf>,
}

/// `process` (also `exec --process`'s file).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// Run on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// Who runs it.
    #[serde(default)]
    pub user: UserSpec,
    /// Program and arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// KEY=VALUE.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absolute).
    #[serde(default)]
    pub cwd: String,
    /// Resource limits.
    #[serde(default)]
    pub rlimits: Vec<RlimitSpec>,
}

/// `process.user`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// `process.rlimits[]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RlimitSpec {
    /// RLIMIT_NOFILE, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The soft limit.
    #[serde(default)]
    pub soft: u64,
    /// The hard limit.
    #[serde(default)]
    pub hard: u64,
}

/// `root`.
#[derive(Clone, Debug, Deserialize)]
pub struct RootSpec {
    /// The root directory, relative to the bundle or absolute.
    pub path: PathBuf,
    /// Read-only root.
    #[serde(default)]
    pub readonly: bool,
}

/// `mounts[]`.
#[derive(Clone, Debug, Deserialize)]
pub struct MountSpec {
    /// Where in the container.
    pub destination: String,
    /// bind, tmpfs, proc, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The host path (bind) or device.
    pub source: Option<PathBuf>,
    /// Mount options (ro, rbind, ...).
    #[serde(default)]
    pub options: Vec<String>,
}

/// The file systems the guest kernel and kiln's init give the guest
/// anyway: the container's own entries for them are not needed.
const GUEST_OWN_MOUNTS: [&str; 8] = [
    "/proc",
    "/sys",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys/fs/cgroup",
    "/sys/fs/mqueue",
];

/// What a container's VM gets from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPlan {
    /// The root directory on the host (absolute).
    pub root: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// Directory bind mounts.
    pub shares: Vec<ShareConfig>,
    /// Files bind-mounted by the engine (/etc/hosts, /etc/resolv.conf,
    /// ...): copied into the root (virtio-fs shares directories; see
    /// `files`).
    pub files: Vec<FileMount>,
    /// tmpfs mounts (a tmpfs in the guest).
    pub tmpfs: Vec<TmpfsConfig>,
    /// Mounts left out (kinds besides bind, tmpfs and the guest's own).
    pub skipped_mounts: Vec<String>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// The network namespace the engine made for the container (the
    /// `network` namespace's path): its interfaces are carried into the
    /// VM. None: see `new_network_namespace`.
    pub network_namespace: Option<PathBuf>,
    /// A `network` namespace without a path: the runtime makes a new one
    /// (the container monitor's), which the engine's hooks may fill
    /// (Docker's); empty (`--network none`): no card. Neither: the host's
    /// network is not carried either.
    pub new_network_namespace: bool,
}

/// Reads `bundle`/config.json. Every error is one line naming the problem.
pub fn load(bundle: &Path) -> Result<Spec, String> {
    let path = bundle.join("config.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "JSON specification file {} not found (is {} an OCI bundle?)",
                path.display(),
                bundle.display()
            ))
        }
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let spec: Spec = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a valid OCI config: {e}", path.display()))?;
    check_version(&spec.oci_version)?;
    Ok(spec)
}

/// Accepts 1.0.x and 1.1.x (with any pre-release suffix, as podman's
/// "1.0.2-dev").
fn check_version(version: &str) -> Result<(), String> {
    let mut parts = version.splitn(3, '.');
    let major_minor = match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}"),
        _ => String::new(),
    };
    match SUPPORTED_VERSIONS.contains(&major_minor.as_str()) {
        true => Ok(()),
        false => Err(format!(
            "unsupported OCI version '{version}' in config.json (kiln-oci reads 1.0.x and 1.1.x)"
        )),
    }
}

impl Spec {
    /// The VM side of the container: its root, shares and hostname.
    pub fn plan(&self, bundle: &Path) -> Result<ContainerPlan, String> {
        let root = self
            .root
            .as_ref()
            .ok_or("config.json has no root (kiln-oci needs root.path)")?;
        let root_path = bundle.join(&root.path);
        if !root_path.is_dir() {
            return Err(format!(
                "root.path {} is not a directory",
                root_path.display()
            ));
        }
        let root_path = std::path::absolute(&root_path)
            .map_err(|e| format!("root.path {}: {e}", root_path.display()))?;
        let network = self
            .linux
            .iter()
            .flat_map(|l| &l.namespaces)
            .find(|n| n.kind == "network");
        let network_namespace = network
            .and_then(|n| n.path.clone())
            .filter(|p| !p.as_os_str().is_empty());
        let mut plan = ContainerPlan {
            root: root_path,
            readonly: root.readonly,
            shares: Vec::new(),
            files: Vec::new(),
            tmpfs: Vec::new(),
            skipped_mounts: Vec::new(),
            hostname: self.hostname.clone().filter(|h| !h.is_empty()),
            new_network_namespace: network.is_some() && network_namespace.is_none(),
            network_namespace,
        };
        for mount in &self.mounts {
            let dest = mount.destination.trim_end_matches('/');
            if GUEST_OWN_MOUNTS.contains(&dest) {
                continue;
            }
            let bind = mount.kind.as_deref() == Some("bind")
                || mount.options.iter().any(|o| o == "bind" || o == "rbind");
            if !bind && mount.kind.as_deref() == Some("tmpfs") {
                plan.tmpfs.push(tmpfs_mount(mount, &plan.root)?);
                continue;
            }
            let source = mount.source.as_ref().map(|s| bundle.join(s));
            match (bind, source) {
                (true, Some(source)) if source.is_dir() => plan.shares.push(ShareConfig {
                    host_dir: source,
                    guest_path: mount.destination.clone(),
                    read_only: mount.options.iter().any(|o| o == "ro"),
                    cache: ShareCache::Auto,
                }),
                (true, Some(source)) if source.is_file() => plan.files.push(FileMount {
                    source,
                    destination: mount.destination.clone(),
                }),
                (true, source) => {
                    return Err(format!(
                        "bind mount source {} for {} is neither a directory nor a regular file",
                        source.unwrap_or_default().display(),
                        mount.destination
                    ))
                }
                (false, _) => plan.skipped_mounts.push(format!(
                    "{} ({})",
                    mount.destination,
                    mount.kind.as_deref().unwrap_or("no type")
                )),
            }
        }
        Ok(plan)
    }

    /// The container's command.
    pub fn process(&self) -> Result<&ProcessSpec, String> {
        self.process
            .as_ref()
            .ok_or_else(|| "config.json has no process".to_string())
    }
}

/// A tmpfs mount of the spec. `tmpcopyup` (podman's default: copy what the
/// image has at the mount point into the new tmpfs) is accepted where there
/// is nothing to copy, and otherwise refused: kiln does not copy yet.
fn tmpfs_mount(mount: &MountSpec, root: &Path) -> Result<TmpfsConfig, String> {
    let dest = &mount.destination;
    let mut options: Vec<&str> = Vec::new();
    for option in &mount.options {
        match option.as_str() {
            "notmpcopyup" => {}
            "tmpcopyup" => {
                let inside = root.join(dest.trim_start_matches('/'));
                let has_content = std::fs::read_dir(&inside)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                if has_content {
                    return Err(format!(
                        "tmpfs {dest}: option 'tmpcopyup' over a non-empty directory is not supported yet"
                    ));
                }
            }
            other => options.push(other),
        }
    }
    TmpfsConfig::with_options(dest, &options)
}

impl ProcessSpec {
    /// The guest command: program, arguments, environment, working
    /// directory, ids, supplementary groups and rlimits; stdin piped (the monitor feeds it its own). A
    /// terminal is the monitor's to add (it knows the size).
    pub fn command(&self) -> Result<Command, String> {
        let Some((program, args)) = self.args.split_first() else {
            return Err("process.args must not be empty".into());
        };
        let mut command = Command::new(program).args(args);
        for entry in &self.env {
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            command = command.env(key, value);
        }
        if !self.cwd.is_empty() {
            command = command.current_dir(&self.cwd);
        }
        for limit in &self.rlimits {
            let resource = Resource::from_name(&limit.kind)
                .ok_or_else(|| format!("process.rlimits: unknown type {:?}", limit.kind))?;
            if limit.soft > limit.hard {
                return Err(format!(
                    "process.rlimits: {} soft limit {} is above its hard limit {}",
                    limit.kind, limit.soft, limit.hard
                ));
            }
            command = command.rlimit(resource, limit.soft, limit.hard);
        }
        Ok(command
            .uid(self.user.uid)
            .gid(self.user.gid)
            .groups(self.user.additional_gids.iter().copied())
            .stdin_piped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_1_0_and_1_1_are_read_others_refused() {
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.1.0-rc.1"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["2.0.0", "0.9", "1", "", "1.2.0"] {
            let e = check_version(bad).unwrap_err();
            assert!(e.contains("unsupported OCI version"), "{e}");
        }
    }

    #[test]
    fn the_network_namespace_is_the_network_entry_with_a_path() {
        let bundle = std::env::temp_dir().join(format!("kiln-spec-netns-{}", std::process::id()));
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let plan = |linux: &str| {
            let json = format!(r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}}{linux}}}"#);
            let spec: Spec = serde_json::from_str(&json).unwrap();
            let plan = spec.plan(&bundle).unwrap();
            (plan.network_namespace, plan.new_network_namespace)
        };
        let engine_made = r#","linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/run/netns/cni-1"}]}"#;
        assert_eq!(
            plan(engine_made),
            (Some(PathBuf::from("/run/netns/cni-1")), false)
        );
        // A new namespace (the runtime's to make: Docker, --network none);
        // none at all, no linux: the host's, not carried.
        let fresh = r#","linux":{"namespaces":[{"type":"network"},{"type":"mount","path":"/x"}]}"#;
        assert_eq!(plan(fresh), (None, true));
        assert_eq!(plan(r#","linux":{}"#), (None, false));
        assert_eq!(plan(""), (None, false));
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    #[test]
    fn tmpfs_mounts_become_guest_tmpfs() {
        let bundle = std::env::temp_dir().join(format!("kiln-spec-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(bundle.join("rootfs/full")).unwrap();
        std::fs::write(bundle.join("rootfs/full/file"), "x").unwrap();
        let plan = |mounts: &str| {
            let json = format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"mounts":[{mounts}]}}"#
            );
            let spec: Spec = serde_json::from_str(&json).unwrap();
            spec.plan(&bundle)
        };
        // What podman writes for --tmpfs /scratch:size=1m,mode=1777.
        let podman = r#"{"destination":"/scratch","type":"tmpfs","source":"tmpfs",
            "options":["rw","rprivate","noexec","nosuid","nodev","tmpcopyup","size=1m","mode=1777"]},
            {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid"]},
            {"destination":"/dev/mqueue","type":"mqueue","source":"mqueue"}"#;
        let p = plan(podman).unwrap();
        assert_eq!(
            p.tmpfs,
            [TmpfsConfig {
                guest_path: "/scratch".into(),
                size: Some(1 << 20),
                mode: Some(0o1777),
                read_only: false,
                nosuid: true,
                nodev: true,
                noexec: true,
                strictatime: false,
                noatime: false,
            }]
        );
        assert!(p.skipped_mounts.is_empty(), "{:?}", p.skipped_mounts);
        // What containerd's default spec has at /run.
        let containerd = r#"{"destination":"/run","type":"tmpfs","source":"tmpfs",
            "options":["nosuid","strictatime","mode=755","size=65536k"]}"#;
        assert_eq!(
            plan(containerd).unwrap().tmpfs,
            [TmpfsConfig {
                guest_path: "/run".into(),
                size: Some(64 << 20),
                mode: Some(0o755),
                nosuid: true,
                strictatime: true,
                ..TmpfsConfig::default()
            }]
        );
        let one = |options: &str| {
            plan(&format!(
                r#"{{"destination":"/full","type":"tmpfs","options":[{options}]}}"#
            ))
        };
        assert_eq!(
            one(r#""tmpcopyup""#).unwrap_err(),
            "tmpfs /full: option 'tmpcopyup' over a non-empty directory is not supported yet"
        );
        assert!(one(r#""notmpcopyup","ro""#).unwrap().tmpfs[0].read_only);
        assert_eq!(
            one(r#""size=10%""#).unwrap_err(),
            "tmpfs /full: option 'size=10%': a size in bytes, or with k, m or g"
        );
        assert_eq!(
            one(r#""nr_inodes=5""#).unwrap_err(),
            "tmpfs /full: option 'nr_inodes=5': not a tmpfs option kiln knows"
        );
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    #[test]
    fn a_process_becomes_the_guest_command() {
        let process: ProcessSpec = serde_json::from_str(
            r#"{"user":{"uid":1000,"gid":100},"args":["sh","-c","echo $A"],"env":["A=1","B"],"cwd":"/tmp"}"#,
        )
        .unwrap();
        let command = process.command().unwrap();
        let spec = &command.spec;
        assert_eq!(spec.argv, [&b"sh"[..], b"-c", b"echo $A"]);
        assert_eq!(
            spec.env,
            [(b"A".to_vec(), b"1".to_vec()), (b"B".to_vec(), vec![])]
        );
        assert_eq!(spec.cwd.as_deref(), Some(&b"/tmp"[..]));
        assert_eq!((spec.uid, spec.gid), (Some(1000), Some(100)));
        let empty: ProcessSpec = serde_json::from_str(r#"{"args":[]}"#).unwrap();
        assert!(empty.command().unwrap_err().contains("must not be empty"));
        let limited: ProcessSpec = serde_json::from_str(
            r#"{"user":{"uid":1,"gid":2,"additionalGids":[4242,10]},"args":["id"],
                "rlimits":[{"type":"RLIMIT_NOFILE","soft":1024,"hard":4096},
                           {"type":"RLIMIT_CORE","soft":0,"hard":18446744073709551615}]}"#,
        )
        .unwrap();
        let spec = limited.command().unwrap().spec;
        assert_eq!(spec.groups, [4242, 10]);
        let limits: Vec<_> = spec
            .rlimits
            .iter()
            .map(|l| (l.resource, l.soft, l.hard))
            .collect();
        assert_eq!(
            limits,
            [
                (Resource::Nofile, 1024, 4096),
                (Resource::Core, 0, u64::MAX)
            ]
        );
        let bad = |rlimit: &str| {
            let json = format!(r#"{{"args":["id"],"rlimits":[{rlimit}]}}"#);
            let process: ProcessSpec = serde_json::from_str(&json).unwrap();
            process.command().unwrap_err()
        };
        assert_eq!(
            bad(r#"{"type":"RLIMIT_NOPE","soft":1,"hard":1}"#),
            r#"process.rlimits: unknown type "RLIMIT_NOPE""#
        );
        assert_eq!(
            bad(r#"{"type":"RLIMIT_NPROC","soft":2,"hard":1}"#),
            "process.rlimits: RLIMIT_NPROC soft limit 2 is above its hard limit 1"
        );
        assert!(empty.command().unwrap_err().contains("must not be empty"));
    }
}
