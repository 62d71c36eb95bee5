//! kiln-oci's defaults for what engines do not pass: the guest kernel,
//! memory and vCPUs, from `--kernel` or the configuration file
//! (`--config FILE`, else $KILN_OCI_CONFIG, else /etc/kiln/oci.toml):
//!
//! ```toml
//! kernel = "/usr/lib/kiln/vmlinux"
//! memory = "512M"   # or a number of bytes
//! vcpus = 2
//! root = "/run/kiln-oci"   # the state root when --root is not given
//! container_root = "shared" # or "packed" (see `ContainerRoot`)
//! ```
//!
//! `root` belongs here rather than in an engine's runtime flags: podman
//! passes its `--runtime-flag`s to create, start, exec and kill but not to
//! the `delete` of its clean-up process, which would then look elsewhere.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cli::{GlobalArgs, DEFAULT_ROOT};
use crate::config::{parse_size, DEFAULT_MEM_BYTES};

/// The configuration file when neither `--config` nor the variable names one.
pub const DEFAULT_CONFIG: &str = "/etc/kiln/oci.toml";
/// The variable naming the configuration file.
pub const CONFIG_ENV: &str = "KILN_OCI_CONFIG";

/// The VM settings of every container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// How the container's root reaches the guest.
    pub container_root: ContainerRoot,
}

/// How the bundle's root reaches the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRoot {
    /// Through virtio-fs (a virtiofsd per container), writable: the
    /// guest's writes land in the engine's upper layer (`podman diff`).
    #[default]
    Shared,
    /// Packed into the initramfs at every create, for hosts without
    /// virtiofsd: the boot grows with the root's size (on the PVM test
    /// hosts a 50 MiB root took 650 s against 43 s shared), the guest's
    /// writes stay in its RAM and end with it, and directory volumes are
    /// refused (they are virtio-fs shares too).
    Packed,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    kernel: Option<PathBuf>,
    memory: Option<Size>,
    vcpus: Option<u8>,
    root: Option<PathBuf>,
    container_root: Option<ContainerRoot>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// The settings of this call: `--kernel` over the file's `kernel`. Fails
/// with one line when no kernel is configured or it is not a file, or the
/// file (named explicitly, or present at the default place) is bad.
pub fn resolve(global: &GlobalArgs) -> Result<Settings, String> {
    let file = file_settings(global)?;
    let kernel = global.kernel.clone().or(file.kernel).ok_or(
        "no guest kernel configured: pass --kernel PATH (podman: --runtime-flag kernel=PATH) \
         or set kernel in /etc/kiln/oci.toml",
    )?;
    if !kernel.is_file() {
        return Err(format!("guest kernel {} is not a file", kernel.display()));
    }
    let mem_bytes = match file.memory {
        None => DEFAULT_MEM_BYTES,
        Some(Size::Bytes(n)) => n,
        Some(Size::Text(t)) => parse_size(&t).map_err(|e| format!("memory: {e}"))?,
    };
    let kernel = std::path::absolute(&kernel)
        .map_err(|e| format!("guest kernel {}: {e}", kernel.display()))?;
    Ok(Settings {
        kernel,
        mem_bytes,
        vcpus: file.vcpus.unwrap_or(1),
        container_root: file.container_root.unwrap_or_default(),
    })
}

/// The state root: `--root`, else the file's `root`, else /run/kiln-oci.
pub fn state_root(global: &GlobalArgs) -> Result<PathBuf, String> {
    if let Some(root) = &global.root_arg {
        return Ok(root.clone());
    }
    Ok(file_settings(global)?
        .root
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)))
}

/// The configuration file's settings (none without a file).
fn file_settings(global: &GlobalArgs) -> Result<FileSettings, String> {
    let named = global
        .config
        .clone()
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    match &named {
        Some(path) => read(path),
        None if Path::new(DEFAULT_CONFIG).exists() => read(Path::new(DEFAULT_CONFIG)),
        None => Ok(FileSettings::default()),
    }
}

fn read(path: &Path) -> Result<FileSettings, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the configuration {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        format!(
            "{} is not a valid kiln-oci configuration: {first}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_gives_kernel_memory_and_vcpus() {
        let s: FileSettings =
            toml::from_str("kernel = \"/k\"\nmemory = \"512M\"\nvcpus = 2\nroot = \"/r\"\n")
                .unwrap();
        assert_eq!(s.kernel.as_deref(), Some(Path::new("/k")));
        assert!(matches!(s.memory, Some(Size::Text(ref t)) if t == "512M"));
        assert_eq!(s.vcpus, Some(2));
        assert_eq!(s.root.as_deref(), Some(Path::new("/r")));
        let bytes: FileSettings = toml::from_str("memory = 1048576\n").unwrap();
        assert!(matches!(bytes.memory, Some(Size::Bytes(1048576))));
        assert!(toml::from_str::<FileSettings>("kernal = \"/k\"\n").is_err());
        let packed: FileSettings = toml::from_str("container_root = \"packed\"\n").unwrap();
        assert_eq!(packed.container_root, Some(ContainerRoot::Packed));
        assert!(toml::from_str::<FileSettings>("container_root = \"copied\"\n").is_err());
    }
}
