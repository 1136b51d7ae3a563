//! `imagefs inspect REF [--format json]`: manifest, config and layers, without fetching any
//! layer.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::common::{self, Context};

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub reference: String,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub async fn run(ctx: &Context, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let r = ctx.resolver().resolve(&reference).await?;
    let platform = r.config.platform();
    let layers: Vec<_> = r
        .manifest
        .layers
        .iter()
        .zip(&r.config.rootfs.diff_ids)
        .map(|(l, diff_id)| {
            json!({
                "digest": l.digest,
                "mediaType": l.media_type,
                "size": l.size,
                "diffId": diff_id,
            })
        })
        .collect();
    match args.format {
        Format::Json => {
            let out = json!({
                "reference": r.reference.to_string(),
                "manifestDigest": r.manifest_digest,
                "mediaType": r.media_type,
                "configDigest": r.manifest.config.digest,
                "imageId": r.image_id(),
                "platform": {
                    "os": platform.os,
                    "architecture": platform.architecture,
                    "variant": platform.variant,
                },
                "layers": layers,
                "config": r.config.raw,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            println!("Reference:  {}", r.reference);
            println!("Digest:     {}", r.manifest_digest);
            println!("Media type: {}", r.media_type);
            println!("Image ID:   {}", r.image_id());
            println!("Platform:   {platform}");
            println!("Layers:");
            for (l, diff_id) in r.manifest.layers.iter().zip(&r.config.rootfs.diff_ids) {
                println!("  {}  {:>12}  {}", l.digest, l.size, l.media_type);
                println!("    diff_id {diff_id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
