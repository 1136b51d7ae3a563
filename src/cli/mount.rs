//! `imagefs mount REF MOUNTPOINT` and `imagefs umount MOUNTPOINT` (written with the fs task).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct MountArgs {
    pub reference: String,
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

pub fn run(_g: &GlobalOpts, _args: MountArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("mount is not available yet")
}

pub fn umount(_args: UmountArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("umount is not available yet")
}
