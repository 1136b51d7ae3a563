//! The peer that says what a mount must show: `skopeo copy` an image from a test registry into
//! an OCI layout, then `umoci unpack` it (as root, so owners, devices and xattrs are
//! restored). The resulting `rootfs/` is the expected tree.
//!
//! umoci 0.4.7 refuses `tar+zstd` layers ("blob is not correct mediatype"), so skopeo writes
//! every layer as gzip (`--dest-compress-format gzip`: zstd layers are recompressed, gzip ones
//! kept, uncompressed ones compressed, as skopeo does for `oci:` anyway). The layer tars, and
//! so the config's diff_ids and the expected tree, are unchanged.
//!
//! This module knows nothing of imagefs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::cmd::Cmd;
use super::registry::Registry;

/// An unpacked image; the directory is removed on drop.
pub struct Oracle {
    dir: TempDir,
    /// How long copy + unpack took.
    pub took: Duration,
}

impl Oracle {
    /// Copies `repo_ref` (`REPO:TAG`) of the anonymous `registry` into an OCI layout and
    /// unpacks it. `platform` (`os/arch[/variant]`) picks an entry of a multi-platform index.
    pub fn unpack(registry: &Registry, repo_ref: &str, platform: Option<&str>) -> Oracle {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-oracle-")
            .tempdir()
            .expect("create oracle dir");
        let started = Instant::now();
        let layout = format!("{}:oracle", dir.path().join("layout").display());
        let mut copy = Cmd::program("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
            .args(["--src-no-creds", "--dest-compress-format", "gzip"])
            .timeout(Duration::from_secs(300));
        if let Some(p) = platform {
            let parts: Vec<&str> = p.split('/').collect();
            copy = copy
                .args(["--override-os", parts[0], "--override-arch", parts[1]])
                .args(
                    parts
                        .get(2)
                        .map(|v| ["--override-variant", v])
                        .into_iter()
                        .flatten(),
                );
        }
        copy.arg(format!("docker://{}/{repo_ref}", registry.addr()))
            .arg(format!("oci:{layout}"))
            .run()
            .assert_success();
        Cmd::program("umoci")
            .args(["unpack", "--image", &layout])
            .arg(dir.path().join("bundle"))
            .timeout(Duration::from_secs(300))
            .run()
            .assert_success();
        Oracle {
            dir,
            took: started.elapsed(),
        }
    }

    /// The unpacked root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("bundle/rootfs")
    }
}
