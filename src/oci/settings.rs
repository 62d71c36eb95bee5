//! kiln-oci's defaults for what engines do not pass: the guest kernel,
//! memory and vCPUs, from `--kernel` or the configuration file
//! (`--config FILE`, else $KILN_OCI_CONFIG, else /etc/kiln/oci.toml):
//!
//! ```toml
//! kernel = "/usr/lib/kiln/vmlinux"
//! memory = "512M"   # or a number of bytes
//! vcpus = 2
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cli::GlobalArgs;
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    kernel: Option<PathBuf>,
    memory: Option<Size>,
    vcpus: Option<u8>,
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
    let named = global
        .config
        .clone()
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
    let file = match &named {
        Some(path) => read(path)?,
        None if Path::new(DEFAULT_CONFIG).exists() => read(Path::new(DEFAULT_CONFIG))?,
        None => FileSettings::default(),
    };
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
    })
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
            toml::from_str("kernel = \"/k\"\nmemory = \"512M\"\nvcpus = 2\n").unwrap();
        assert_eq!(s.kernel.as_deref(), Some(Path::new("/k")));
        assert!(matches!(s.memory, Some(Size::Text(ref t)) if t == "512M"));
        assert_eq!(s.vcpus, Some(2));
        let bytes: FileSettings = toml::from_str("memory = 1048576\n").unwrap();
        assert!(matches!(bytes.memory, Some(Size::Bytes(1048576))));
        assert!(toml::from_str::<FileSettings>("kernal = \"/k\"\n").is_err());
    }
}
