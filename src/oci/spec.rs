//! The bundle's config.json (the OCI runtime spec), the part of it a VM
//! uses, and what it becomes: the VM's root and shares, and the guest
//! command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::FileMount;
use super::hooks::HooksSpec;
use super::resources::ResourcesSpec;
use crate::config::{ShareCache, ShareConfig};
use crate::sandbox::Command;

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
    /// Mounts left out (tmpfs and other kinds besides the guest's own).
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

impl ProcessSpec {
    /// The guest command: program, arguments, environment, working
    /// directory and ids; stdin piped (the monitor feeds it its own). A
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
        Ok(command.uid(self.user.uid).gid(self.user.gid).stdin_piped())
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
    }
}
