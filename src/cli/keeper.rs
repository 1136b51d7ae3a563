//! `imagefs ps` and `imagefs upgrade`: the live mounts of a cache, asked of their keepers (see
//! `fs::keeper`), and replacing their servers by this binary without unmounting.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;

use super::GlobalOpts;
use super::common;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = PsFormat::Table)]
    pub format: PsFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PsFormat {
    Table,
    /// An array of objects: mountpoint, reference, manifestDigest, keeperPid, serverPid,
    /// restarts, uptime (seconds), passthrough
    Json,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true))]
pub struct UpgradeArgs {
    /// The mount whose server to replace
    #[arg(group = "which")]
    pub mountpoint: Option<PathBuf>,
    /// Every live mount of the cache
    #[arg(long, group = "which")]
    pub all: bool,
}

/// The keys `ps --format json` shows, in order.
const KEYS: [&str; 8] = [
    "mountpoint",
    "reference",
    "manifestDigest",
    "keeperPid",
    "serverPid",
    "restarts",
    "uptime",
    "passthrough",
];

pub fn ps(g: &GlobalOpts, args: PsArgs) -> anyhow::Result<ExitCode> {
    let run_dir = common::cache_dir(g)?.join("run");
    let live: Vec<Value> = crate::fs::keeper::live(&run_dir)
        .into_iter()
        .map(|(_, status)| {
            let mut shown = serde_json::Map::new();
            for k in KEYS {
                shown.insert(k.into(), status.get(k).cloned().unwrap_or(Value::Null));
            }
            Value::Object(shown)
        })
        .collect();
    match args.format {
        PsFormat::Json => println!("{}", serde_json::to_string_pretty(&live)?),
        PsFormat::Table => {
            println!(
                "{:<32} {:<40} {:>7} {:>7} {:>8} {:>8}  MANIFEST",
                "MOUNTPOINT", "REFERENCE", "KEEPER", "SERVER", "RESTARTS", "UPTIME"
            );
            for m in &live {
                let text = |k: &str| match &m[k] {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    v => v.to_string(),
                };
                let uptime = m["uptime"].as_u64().map_or("-".into(), |s| {
                    humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
                });
                println!(
                    "{:<32} {:<40} {:>7} {:>7} {:>8} {:>8}  {}",
                    text("mountpoint"),
                    text("reference"),
                    text("keeperPid"),
                    text("serverPid"),
                    text("restarts"),
                    uptime,
                    text("manifestDigest"),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn upgrade(g: &GlobalOpts, args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let run_dir = common::cache_dir(g)?.join("run");
    let exe = std::env::current_exe().context("locating the imagefs executable")?;
    let live = crate::fs::keeper::live(&run_dir);
    let targets: Vec<_> = match &args.mountpoint {
        Some(mp) => {
            let mp = mp
                .canonicalize()
                .with_context(|| format!("mount point {}", mp.display()))?;
            let found: Vec<_> = live
                .into_iter()
                .filter(|(_, s)| s["mountpoint"].as_str() == mp.to_str())
                .collect();
            if found.is_empty() {
                bail!(
                    "no live imagefs mount at {} in cache {} (see `imagefs ps`)",
                    mp.display(),
                    run_dir.parent().unwrap_or(&run_dir).display()
                );
            }
            found
        }
        None => live,
    };
    let mut failed = 0;
    for (socket, status) in targets {
        let mp = status["mountpoint"].as_str().unwrap_or("?").to_owned();
        match crate::fs::keeper::upgrade(&socket, &exe) {
            Ok(answer) if answer.get("error").is_none() => {
                println!(
                    "{mp}: server {} replaced by {} ({})",
                    status["serverPid"],
                    answer["serverPid"],
                    exe.display()
                );
            }
            Ok(answer) => {
                failed += 1;
                eprintln!(
                    "imagefs: {mp}: {}",
                    answer["error"].as_str().unwrap_or("failed")
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("imagefs: {mp}: asking its keeper: {e}");
            }
        }
    }
    Ok(match failed {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
