//! `imagefs convert SRC DST`: make an image lazy. Pulls SRC (verified, into the cache),
//! rewrites its layers as eStargz and pushes the result to DST ([`crate::image::convert`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::common::{self, Context};
use super::progress::Reporter;
use crate::image::convert::{self, ConvertOptions, Outcome, Stage, StageFn};
use crate::layer::estargz::WriterOptions;
use crate::layer::index::clean_path;
use crate::oci::Digest;
use crate::registry::BlobPush;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The image to convert, e.g. registry:5000/app:1.0
    pub source: String,
    /// Where to push the result, by tag (e.g. registry:5000/app:1.0-esgz)
    pub destination: String,
    /// The lazy format to write
    #[arg(long, value_enum, default_value_t = Format::Estargz)]
    pub format: Format,
    /// Largest chunk of a file per gzip member: the unit of a lazy read
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = super::units::parse_size)]
    pub chunk_size: u64,
    /// gzip level, 1 (fastest) to 9 (smallest)
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compression_level: u32,
    /// Put the files listed in FILE (one path per line, as `mount --record` writes) first in
    /// each layer, before the prefetch landmark: a mount fetches them in one request per layer
    #[arg(long, value_name = "FILE")]
    pub prioritize: Option<PathBuf>,
    /// Convert every platform of a multi-platform index, and push an index
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// Compressor threads [default: the number of CPUs]
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// eStargz: readable by any registry client, lazy with imagefs and stargz-snapshotter
    Estargz,
}

pub async fn run(ctx: &Context, args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let Format::Estargz = args.format;
    if ctx.offline {
        anyhow::bail!("convert pushes to a registry: it cannot run with --offline");
    }
    let src = common::parse_reference(&args.source)?;
    let dst = common::parse_reference(&args.destination)?;
    if args.chunk_size == 0 {
        anyhow::bail!("--chunk-size must be positive");
    }
    let prioritize = match &args.prioritize {
        Some(path) => read_list(path)?,
        None => Vec::new(),
    };
    let options = ConvertOptions {
        writer: WriterOptions {
            chunk_size: args.chunk_size,
            compression: args.compression_level,
            ..WriterOptions::default()
        },
        prioritize,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let reporter = Reporter::new(ctx.quiet, ctx.tty);
    reporter.line(&format!("Converting {src} to eStargz as {dst}"));
    let callbacks: Mutex<HashMap<Digest, StageFn>> = Mutex::default();
    let progress = |digest: &Digest| {
        let mut map = callbacks.lock().expect("progress lock");
        map.entry(digest.clone())
            .or_insert_with(|| reporter.convert_layer(common::short(digest)))
            .clone()
    };
    let resolver = ctx.resolver();
    let digest = convert::convert_and_push(
        &resolver,
        &src,
        &dst,
        args.all_platforms,
        &options,
        &progress,
    )
    .await?;
    // The source is in the cache now, as after a pull: the cache bound applies (nothing
    // needs protecting, the result is pushed).
    crate::image::engine::enforce_cache_bound(&ctx.store, ctx.cache_max, &digest);
    println!("Digest: {digest}");
    Ok(ExitCode::SUCCESS)
}

/// The paths of a `--prioritize` file: one per line, absolute or not, blank lines skipped.
fn read_list(path: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .map(clean_path)
        .filter(|p| !p.is_empty())
        .collect())
}

impl Reporter {
    /// A callback for one layer's conversion stages, labelled `label` (a short digest).
    pub fn convert_layer(&self, label: String) -> StageFn {
        let fetch = self.layer(label.clone(), 0);
        let reporter = self.clone();
        Arc::new(move |stage| match stage {
            Stage::Fetch(e) => fetch(e),
            Stage::Rewriting => reporter.line(&format!("{label}: converting")),
            Stage::Done(Outcome::Converted { prioritized: 0 }) => {}
            Stage::Done(Outcome::Converted { prioritized }) => {
                reporter.line(&format!("{label}: {prioritized} entries prioritised"))
            }
            Stage::Done(Outcome::AlreadyEstargz) => {
                reporter.line(&format!("{label}: eStargz already, kept"))
            }
            Stage::Done(Outcome::Kept { reason }) => {
                reporter.line(&format!("{label}: kept as it is (not lazy): {reason}"))
            }
            Stage::Pushing { .. } => {}
            Stage::Pushed(how) => reporter.line(&format!(
                "{label}: {}",
                match how {
                    BlobPush::Exists => "already in the destination",
                    BlobPush::Mounted => "mounted from the source repository",
                    BlobPush::Uploaded => "pushed",
                }
            )),
        })
    }
}
