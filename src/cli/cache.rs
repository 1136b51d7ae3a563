//! `imagefs cache ls | du | prune | verify | gc`: what the cache holds and keeping it in
//! bounds. The accounting and the eviction rules live in the store (`store::cache`).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::{Args, Subcommand};

use super::common::Context;
use super::units::{parse_duration, parse_size};
use crate::store::{Removed, format_size};

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Images in the cache: references, size (shared layers counted for each image, and what
    /// evicting the image alone would free), last use, live mounts
    Ls,
    /// Disk usage by kind; entries shared by several images are counted once
    Du,
    /// Evict images no live mount uses (least recently used first)
    Prune(PruneArgs),
    /// Re-hash every blob and cached eStargz chunk; report and drop the corrupt ones
    Verify,
    /// Remove blobs, layers and chunk caches that no image uses
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Every image (but those mounted)
    #[arg(long, conflicts_with_all = ["older_than", "max_size"])]
    pub all: bool,
    /// Images last used longer ago than this (e.g. 7d, 12h, 30m)
    #[arg(long, value_parser = parse_duration, conflicts_with = "max_size")]
    pub older_than: Option<Duration>,
    /// Until the images' data fits this size (e.g. 20G)
    #[arg(long, allow_negative_numbers = true, value_parser = parse_size)]
    pub max_size: Option<u64>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep entries younger than this: they may belong to a pull in progress
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub min_age: Duration,
}

fn ago(t_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(t_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn report(what: &str, r: &Removed) {
    println!(
        "{what}: {} image(s), {} entr{} ({})",
        r.images.len(),
        r.entries,
        if r.entries == 1 { "y" } else { "ies" },
        format_size(r.bytes)
    );
}

pub fn run(ctx: &Context, args: CacheArgs) -> anyhow::Result<ExitCode> {
    let store = &ctx.store;
    match args.command {
        CacheCommand::Ls => {
            println!("IMAGE\tLAYERS\tSIZE\tEXCLUSIVE\tLAST USED\tMOUNTED AT\tREFERENCES");
            for u in store.image_usage()? {
                let mounts: Vec<String> = u
                    .mounts
                    .iter()
                    .map(|m| m.mountpoint.display().to_string())
                    .collect();
                let refs: Vec<&str> = u.record.references.iter().map(String::as_str).collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    u.record.manifest,
                    u.record.layers.len(),
                    format_size(u.bytes),
                    format_size(u.exclusive),
                    ago(u.record.last_used_ms),
                    if mounts.is_empty() {
                        "-".to_owned()
                    } else {
                        mounts.join(",")
                    },
                    refs.join(",")
                );
            }
        }
        CacheCommand::Du => {
            let u = store.usage();
            println!("blobs\t{}\t{}", u.blobs, format_size(u.blobs));
            println!("layers\t{}\t{}", u.layers, format_size(u.layers));
            println!("estargz\t{}\t{}", u.estargz, format_size(u.estargz));
            println!("other\t{}\t{}", u.other, format_size(u.other));
            println!("total\t{}\t{}", u.total(), format_size(u.total()));
        }
        CacheCommand::Prune(p) => {
            let removed = if p.all {
                store.prune_to(0, &[])?
            } else if let Some(age) = p.older_than {
                store.prune_older_than(age)?
            } else if let Some(max) = p.max_size {
                store.prune_to(max, &[])?
            } else {
                bail!("say what to prune: --all, --older-than DURATION or --max-size SIZE");
            };
            report("pruned", &removed);
            for d in &removed.images {
                println!("evicted {d}");
            }
        }
        CacheCommand::Verify => {
            let (checked, corrupt) = store.verify()?;
            for c in &corrupt {
                println!("corrupt {}: {}", c.path.display(), c.reason);
            }
            println!(
                "verified {checked} blob(s) and eStargz chunk(s), {} corrupt",
                corrupt.len()
            );
            if !corrupt.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        CacheCommand::Gc(g) => report("collected", &store.gc(g.min_age)?),
    }
    Ok(ExitCode::SUCCESS)
}
