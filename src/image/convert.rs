//! Converting an image to eStargz and pushing it: `imagefs convert`'s engine.
//!
//! For each layer of the source image:
//!
//! 1. A layer that is eStargz already (its descriptor has the TOC digest annotation and its
//!    footer and TOC verify against it, [`Store::lazy_layer`]) is kept as it is, unless files
//!    are to be prioritised.
//! 2. Any other layer is fetched, verified and extracted into the store as `pull` does
//!    ([`Store::ensure_layer`]), then written from the store's index, entry by entry in tar
//!    order, as an eStargz blob ([`crate::layer::estargz::Writer`], its members compressed by
//!    a shared [`Pool`] on every core) into a temporary file of the store. Files to prioritise
//!    come first, before `.prefetch.landmark` ([`prioritized_order`]).
//! 3. A layer the TOC cannot describe (a name, link target or xattr name that is not UTF-8,
//!    an mtime outside RFC 3339's years) is kept as it is, with the reason: the image stays
//!    exact, and that one layer is fetched whole when mounted.
//!
//! The config is the source's with the new diff_ids (every other field kept as it was); the
//! manifest is an OCI manifest whose converted layers carry the
//! `containerd.io/snapshot/stargz/toc.digest` and `io.containers.estargz.uncompressed-size`
//! annotations. When every layer was kept, the source's manifest and config bytes are pushed
//! unchanged: converting an eStargz image again gives the same digest.
//!
//! Pushing ([`push_image`]): every blob first (each one skipped when the destination has it,
//! mounted from the source repository when both are on one registry), the manifest last, so a
//! failure never leaves a manifest whose blobs are missing.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt as _;

use super::{Error, Resolved, Resolver, layer_jobs};
use crate::layer::estargz::{
    Landmark, Pool, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, WriteError, Writer,
    WriterOptions, is_meta_name,
};
use crate::layer::index::{Entry, EntryKind, LayerIndex, path_components};
use crate::oci::manifest::{Descriptor, ImageIndex, ImageManifest};
use crate::oci::{Digest, Hasher, media};
use crate::reference::Reference;
use crate::registry::{BlobBody, BlobPush, Client};
use crate::store::{LayerEvent, Store, StoreError};

/// How layers are rewritten.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Chunk size and gzip level; the landmark is chosen per layer.
    pub writer: WriterOptions,
    /// Files to put first in the layer that provides them, in this order (paths in the
    /// image, without the leading `/`): what `mount --record` wrote.
    pub prioritize: Vec<Vec<u8>>,
    /// Compressor threads.
    pub threads: usize,
}

/// Why a conversion or a push failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Image(#[from] Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("converting layer {digest}")]
    Write {
        digest: Digest,
        #[source]
        source: WriteError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("blob {digest} from the source registry hashes to {actual}")]
    SourceDigest { digest: Digest, actual: Digest },
    #[error("cannot push to {0}: name the destination by a tag, not a digest")]
    DestinationDigest(String),
}

/// What happened to one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Rewritten as eStargz, `prioritized` entries before the landmark.
    Converted { prioritized: usize },
    /// eStargz already (its TOC verified): kept.
    AlreadyEstargz,
    /// Kept as it was, because the TOC cannot describe it.
    Kept { reason: String },
}

/// A layer of the converted image.
pub struct LayerOut {
    pub source: Digest,
    pub desc: Descriptor,
    pub diff_id: Digest,
    pub outcome: Outcome,
    /// The converted blob, for a converted layer; else the source's blob is copied.
    file: Option<Arc<tempfile::NamedTempFile>>,
}

/// A converted image, ready to push.
pub struct ConvertedImage {
    pub source: Reference,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub media_type: String,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<LayerOut>,
}

/// A stage of one layer, for progress display.
#[derive(Clone, Debug)]
pub enum Stage {
    Fetch(LayerEvent),
    Rewriting,
    Done(Outcome),
    Pushing { sent: u64, size: u64 },
    Pushed(BlobPush),
}

/// One layer's callback for its stages.
pub type StageFn = Arc<dyn Fn(Stage) + Send + Sync>;

/// Per layer (by its source digest), the callback for its stages.
pub type Progress<'a> = &'a (dyn Fn(&Digest) -> StageFn + Sync);

/// Convert the image `resolved` (resolved by `resolver`) as `options` say.
pub async fn convert_image(
    resolver: &Resolver,
    resolved: &Resolved,
    options: &ConvertOptions,
    pool: &Pool,
    progress: Progress<'_>,
) -> Result<ConvertedImage, ConvertError> {
    let store = &resolver.store;
    let source = resolver.source(&resolved.reference);
    let ranges = super::RegistryRanges::new(source.clone());
    let jobs = layer_jobs(resolved)?;
    let rewrite_all = !options.prioritize.is_empty();

    // Which layers are eStargz already: kept unless files are prioritised.
    let mut estargz = vec![false; jobs.len()];
    for (i, (desc, job)) in resolved.manifest.layers.iter().zip(&jobs).enumerate() {
        let toc = desc
            .annotation(TOC_DIGEST_ANNOTATION)
            .and_then(|t| t.parse::<Digest>().ok());
        if rewrite_all || toc.is_none() || job.compression != media::Compression::Gzip {
            continue;
        }
        let max = resolved.limits.max_entries;
        estargz[i] = store
            .lazy_layer(&ranges, &job.digest, job.size, toc.as_ref(), max)
            .await?
            .is_some();
    }

    // Fetch and extract the others, concurrently (bounded), as `pull` does.
    let sem = Arc::new(tokio::sync::Semaphore::new(super::LAYER_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (job, _) in jobs.iter().zip(&estargz).filter(|(_, e)| !**e) {
        let (store, source, sem, job) = (store.clone(), source.clone(), sem.clone(), job.clone());
        let stage = progress(&job.digest);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore never closes");
            let events = Arc::new(move |e| stage(Stage::Fetch(e)));
            store.ensure_layer(source, &job, events).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("fetch task panicked")?;
    }

    // Which layer provides each prioritised file: the topmost that has it.
    let mut orders: Vec<Option<(Vec<usize>, usize)>> = vec![None; jobs.len()];
    let mut claimed = HashSet::new();
    for i in (0..jobs.len()).rev().filter(|i| !estargz[*i]) {
        if options.prioritize.is_empty() {
            break;
        }
        let index = store.load_layer_index(&jobs[i].diff_id)?;
        orders[i] = Some(prioritized_order(
            &index.entries,
            &options.prioritize,
            &mut claimed,
        ));
    }

    // Rewrite, each layer on a blocking thread (its members compress on the pool), as many
    // at once as the pool has threads: enough to keep it busy, and each writer holds a few
    // chunks in flight, so the memory stays bounded however many layers there are.
    let writers = Arc::new(tokio::sync::Semaphore::new(options.threads.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, job) in jobs.iter().enumerate() {
        if estargz[i] {
            continue;
        }
        let (store, pool, job) = (store.clone(), pool.clone(), job.clone());
        let order = orders[i].take();
        let writer = options.writer;
        let stage = progress(&job.digest);
        let writers = writers.clone();
        tasks.spawn(async move {
            let _permit = writers
                .acquire_owned()
                .await
                .expect("semaphore never closes");
            let r = tokio::task::spawn_blocking(move || {
                stage(Stage::Rewriting);
                rewrite_layer(&store, &job.diff_id, order, &writer, &pool)
            })
            .await
            .expect("rewrite task panicked");
            (i, r)
        });
    }
    let mut rewritten = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (i, r) = r.expect("rewrite task panicked");
        let out = match r {
            Ok(w) => Ok(w),
            // What the TOC cannot describe stays as it was.
            Err(ConvertError::Write {
                source: source @ WriteError::Entry { .. },
                ..
            }) => Err(source.to_string()),
            Err(e) => return Err(e),
        };
        rewritten.insert(i, out);
    }

    let mut layers = Vec::with_capacity(jobs.len());
    for (i, (desc, job)) in resolved.manifest.layers.iter().zip(&jobs).enumerate() {
        let kept = |outcome| LayerOut {
            source: job.digest.clone(),
            desc: Descriptor {
                media_type: oci_layer_type(&desc.media_type),
                ..desc.clone()
            },
            diff_id: job.diff_id.clone(),
            outcome,
            file: None,
        };
        let layer = match rewritten.remove(&i) {
            None => kept(Outcome::AlreadyEstargz),
            Some(Err(reason)) => {
                tracing::warn!(layer = %job.digest, "kept as it is: {reason}");
                kept(Outcome::Kept { reason })
            }
            Some(Ok(w)) => {
                let annotations = [
                    (TOC_DIGEST_ANNOTATION, w.toc_digest.to_string()),
                    (
                        UNCOMPRESSED_SIZE_ANNOTATION,
                        w.uncompressed_size.to_string(),
                    ),
                ];
                LayerOut {
                    source: job.digest.clone(),
                    desc: Descriptor {
                        media_type: media::OCI_LAYER_TAR_GZIP.to_owned(),
                        digest: w.digest,
                        size: w.size,
                        urls: Vec::new(),
                        annotations: annotations
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect(),
                        platform: None,
                        artifact_type: None,
                    },
                    diff_id: w.diff_id,
                    outcome: Outcome::Converted {
                        prioritized: w.prioritized,
                    },
                    file: Some(Arc::new(w.file)),
                }
            }
        };
        progress(&job.digest)(Stage::Done(layer.outcome.clone()));
        layers.push(layer);
    }
    Ok(assemble(resolved, layers))
}

/// The converted image's config and manifest; the source's own bytes when nothing changed.
fn assemble(resolved: &Resolved, layers: Vec<LayerOut>) -> ConvertedImage {
    let source = resolved.reference.clone();
    if layers.iter().all(|l| l.outcome == Outcome::AlreadyEstargz) {
        return ConvertedImage {
            source,
            manifest: resolved.manifest_bytes.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            media_type: resolved.media_type.clone(),
            config: resolved.config_bytes.clone(),
            config_digest: resolved.manifest.config.digest.clone(),
            layers,
        };
    }
    // Every field of the config as it was, but the diff_ids.
    let mut config: serde_json::Value =
        serde_json::from_slice(&resolved.config_bytes).expect("the config parsed when resolved");
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    let config = serde_json::to_vec(&config).expect("JSON serialises");
    let config_digest = Digest::sha256(&config);
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor {
            media_type: media::OCI_CONFIG.to_owned(),
            digest: config_digest.clone(),
            size: config.len() as u64,
            urls: Vec::new(),
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        },
        layers: layers.iter().map(|l| l.desc.clone()).collect(),
        subject: None,
        annotations: resolved.manifest.annotations.clone(),
    };
    let manifest = serde_json::to_vec(&manifest).expect("JSON serialises");
    ConvertedImage {
        source,
        manifest_digest: Digest::sha256(&manifest),
        manifest,
        media_type: media::OCI_MANIFEST.to_owned(),
        config,
        config_digest,
        layers,
    }
}

/// A Docker layer media type as its OCI equivalent (the bytes are the same).
fn oci_layer_type(media_type: &str) -> String {
    match media_type {
        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_TAR_GZIP,
        media::DOCKER_LAYER_TAR => media::OCI_LAYER_TAR,
        media::DOCKER_LAYER_ZSTD => media::OCI_LAYER_TAR_ZSTD,
        media::DOCKER_FOREIGN_LAYER_GZIP => media::OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP,
        other => other,
    }
    .to_owned()
}

/// A rewritten layer in its temporary file.
struct Rewritten {
    file: tempfile::NamedTempFile,
    digest: Digest,
    size: u64,
    diff_id: Digest,
    toc_digest: Digest,
    uncompressed_size: u64,
    prioritized: usize,
}

/// Write the extracted layer `diff_id` as eStargz, its entries in `order` (with the count
/// that goes before the landmark) or in tar order.
fn rewrite_layer(
    store: &Store,
    diff_id: &Digest,
    order: Option<(Vec<usize>, usize)>,
    options: &WriterOptions,
    pool: &Pool,
) -> Result<Rewritten, ConvertError> {
    let index: LayerIndex = store.load_layer_index(diff_id)?;
    let (order, first) = order.unwrap_or_else(|| ((0..index.entries.len()).collect(), 0));
    let options = WriterOptions {
        landmark: match first {
            0 => Landmark::NoPrefetch,
            after => Landmark::Prefetch { after },
        },
        ..*options
    };
    let tmp = store.root().join("tmp");
    let io_err = |what: String| move |source| ConvertError::Io { what, source };
    std::fs::create_dir_all(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let file = tempfile::NamedTempFile::new_in(&tmp)
        .map_err(io_err(format!("a temporary file in {}", tmp.display())))?;
    let out = BufWriter::with_capacity(
        1 << 20,
        file.as_file()
            .try_clone()
            .map_err(io_err("a temporary file".to_owned()))?,
    );
    let write_err = |source| ConvertError::Write {
        digest: diff_id.clone(),
        source,
    };
    let mut w = Writer::with_pool(out, &options, pool).map_err(write_err)?;
    let data_dir = store.layer_dir(diff_id).join("data");
    // The landmark the writer adds goes after the prioritised entries it is told of; a
    // metadata entry of a source that was eStargz is not content, and is not written again.
    for &i in &order {
        let e: &Entry = &index.entries[i];
        if is_meta_name(&e.path) {
            continue;
        }
        let read_err = io_err(format!(
            "reading {} of layer {diff_id}",
            String::from_utf8_lossy(&e.path)
        ));
        match e.data {
            // Small files sit in the layer's pack; bigger ones are read a chunk at a time.
            Some(data) if e.kind == EntryKind::File => match index.packed.get(data) {
                Some(at) => {
                    let bytes =
                        crate::layer::extract::read_packed(&data_dir, at).map_err(read_err)?;
                    w.append(e, &bytes).map_err(write_err)?;
                }
                None => {
                    let path = crate::layer::tar::data_path(&data_dir, data);
                    let mut file = BufReader::new(File::open(&path).map_err(read_err)?);
                    w.append_from(e, e.size, &mut file).map_err(write_err)?;
                }
            },
            _ => w.append(e, &[]).map_err(write_err)?,
        }
    }
    let written = w.finish().map_err(write_err)?;
    let mut out = written.blob;
    out.flush()
        .map_err(io_err("writing a temporary file".to_owned()))?;
    Ok(Rewritten {
        file,
        digest: written.digest,
        size: written.size,
        diff_id: written.diff_id,
        toc_digest: written.toc_digest,
        uncompressed_size: written.uncompressed_size,
        prioritized: first,
    })
}

/// The order to write a layer's `entries` in so that the `wanted` files this layer provides
/// come first, and how many entries that is. `claimed` holds the paths a higher layer
/// provides (a whiteout counts: it hides the lower ones); this layer adds its own.
///
/// A wanted file moves to the front with its parent directories, and a hardlink with its
/// target, each only when its path appears once in the layer and no whiteout of this layer
/// touches it or a parent: then where it sits in the tar cannot change the tree.
pub fn prioritized_order(
    entries: &[Entry],
    wanted: &[Vec<u8>],
    claimed: &mut HashSet<Vec<u8>>,
) -> (Vec<usize>, usize) {
    let mut at: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        at.entry(e.path.as_slice()).or_default().push(i);
    }
    let only = |p: &[u8]| match at.get(p).map(Vec::as_slice) {
        Some([i]) => Some(*i),
        _ => None,
    };
    // A whiteout of `p`, or an opaque marker in `p` (a directory).
    let whiteout_of = |p: &[u8]| {
        let (dir, name) = split_last(p);
        let wh = join(dir, &[b".wh.", name].concat());
        let opq = join(p, b".wh..wh..opq");
        at.contains_key(wh.as_slice()) || at.contains_key(opq.as_slice())
    };
    // `p` and its parents, root first: the paths whose entries must precede `p`'s.
    let chain = |p: &[u8]| {
        let parts = path_components(p);
        (1..=parts.len())
            .map(|n| parts[..n].join(&b'/'))
            .collect::<Vec<Vec<u8>>>()
    };
    let mut moved = vec![false; entries.len()];
    let mut first = Vec::new();
    for p in wanted {
        if claimed.contains(p) {
            continue;
        }
        if !at.contains_key(p.as_slice()) && !whiteout_of(p) {
            continue;
        }
        claimed.insert(p.clone());
        let Some(i) = only(p) else { continue };
        let mut paths = chain(p);
        if entries[i].kind == EntryKind::Hardlink {
            match entries[i].link.as_deref() {
                Some(target) if only(target).is_some() => {
                    let mut t = chain(target);
                    t.extend(paths);
                    paths = t;
                }
                _ => {}
            }
        } else if entries[i].kind != EntryKind::File {
            continue;
        }
        if paths.iter().any(|q| whiteout_of(q)) {
            continue;
        }
        for q in &paths {
            if let Some(j) = only(q)
                && !moved[j]
            {
                moved[j] = true;
                first.push(j);
            }
        }
    }
    let count = first.len();
    first.extend((0..entries.len()).filter(|&i| !moved[i]));
    (first, count)
}

fn split_last(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&b| b == b'/') {
        Some(k) => (&p[..k], &p[k + 1..]),
        None => (&[], p),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// Push `image`'s blobs, then its manifest as `reference` (a tag, or its digest).
pub async fn push_image(
    client: &Client,
    store: &Store,
    dst: &Reference,
    reference: &str,
    image: &ConvertedImage,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    let src = &image.source;
    let mount_from = (src.registry() == dst.registry() && src.repository() != dst.repository())
        .then(|| src.repository().to_owned());
    let mut tasks = tokio::task::JoinSet::new();
    for layer in &image.layers {
        let (client, store, dst, src) = (client.clone(), store.clone(), dst.clone(), src.clone());
        let (desc, file) = (layer.desc.clone(), layer.file.clone());
        let mount_from = mount_from.clone();
        let stage = progress(&layer.source);
        tasks.spawn(async move {
            let size = desc.size;
            let sent = |sent| stage(Stage::Pushing { sent, size });
            let how = match &file {
                Some(f) => {
                    let body = BlobBody::File(f.path().to_owned());
                    let (registry, repo) = (dst.registry(), dst.repository());
                    let from = mount_from.as_deref();
                    client
                        .push_blob(registry, repo, &desc.digest, size, &body, from, &sent)
                        .await?
                }
                None => {
                    copy_blob(
                        &client,
                        &store,
                        &src,
                        &dst,
                        &desc,
                        mount_from.as_deref(),
                        &sent,
                    )
                    .await?
                }
            };
            stage(Stage::Pushed(how));
            Ok::<_, ConvertError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("push task panicked")?;
    }
    let config = BlobBody::Bytes(bytes::Bytes::from(image.config.clone()));
    client
        .push_blob(
            dst.registry(),
            dst.repository(),
            &image.config_digest,
            image.config.len() as u64,
            &config,
            mount_from.as_deref(),
            &|_| {},
        )
        .await?;
    client
        .push_manifest(
            dst.registry(),
            dst.repository(),
            reference,
            &image.media_type,
            &image.manifest,
        )
        .await?;
    Ok(())
}

/// A kept layer's blob, from the source to the destination: there already, mounted from the
/// source repository (same registry), else downloaded (verified) and uploaded.
async fn copy_blob(
    client: &Client,
    store: &Store,
    src: &Reference,
    dst: &Reference,
    desc: &Descriptor,
    mount_from: Option<&str>,
    sent: &(dyn Fn(u64) + Send + Sync),
) -> Result<BlobPush, ConvertError> {
    let (registry, repo) = (dst.registry(), dst.repository());
    let present = match mount_from {
        Some(from) => {
            client
                .mount_blob(registry, repo, &desc.digest, from)
                .await?
        }
        None => client
            .blob_exists(registry, repo, &desc.digest)
            .await?
            .then_some(BlobPush::Exists),
    };
    if let Some(how) = present {
        return Ok(how);
    }
    let path = download(client, store, src, desc).await?;
    let body = BlobBody::File(path.clone());
    let pushed = client
        .push_blob(registry, repo, &desc.digest, desc.size, &body, None, sent)
        .await;
    let _ = std::fs::remove_file(&path);
    Ok(pushed?)
}

/// The source's blob of a kept layer, downloaded into a temporary file of the store and
/// verified (for a destination on another registry).
async fn download(
    client: &Client,
    store: &Store,
    src: &Reference,
    desc: &Descriptor,
) -> Result<PathBuf, ConvertError> {
    let tmp = store.root().join("tmp");
    let path = tmp.join(format!("push-{}", desc.digest.hex()));
    let io_err = |source| ConvertError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    let mut stream = client
        .blob(src.registry(), src.repository(), &desc.digest, 0, None)
        .await?;
    let mut file = BufWriter::new(File::create(&path).map_err(io_err)?);
    let mut hasher = Hasher::new(desc.digest.algorithm());
    while let Some(chunk) = stream.body.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(io_err)?;
    }
    file.flush().map_err(io_err)?;
    let actual = hasher.finish();
    if actual != desc.digest {
        let _ = std::fs::remove_file(&path);
        return Err(ConvertError::SourceDigest {
            digest: desc.digest.clone(),
            actual,
        });
    }
    Ok(path)
}

/// Convert `src` and push it to `dst`: the image for the resolver's platform, or with
/// `all_platforms` every image of its index (attestations left out: they describe the
/// source's manifests), pushed as an OCI index. Returns the pushed top-level digest.
pub async fn convert_and_push(
    resolver: &Resolver,
    src: &Reference,
    dst: &Reference,
    all_platforms: bool,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<Digest, ConvertError> {
    if dst.digest().is_some() {
        return Err(ConvertError::DestinationDigest(dst.to_string()));
    }
    let tag = dst.tag().unwrap_or("latest").to_owned();
    let pool = Pool::new(options.threads);
    let client = &resolver.client;
    let index = match all_platforms {
        true => resolver.top_index(src).await?,
        false => None,
    };
    let Some((index_digest, index_bytes, index)) = index else {
        let resolved = resolver.resolve(src).await?;
        let image = convert_image(resolver, &resolved, options, &pool, progress).await?;
        push_image(client, &resolver.store, dst, &tag, &image, progress).await?;
        return Ok(image.manifest_digest);
    };
    let children = Resolver {
        platform_explicit: false,
        ..resolver.clone()
    };
    let mut manifests = Vec::new();
    let mut unchanged = true;
    for entry in &index.manifests {
        if entry.is_attestation() {
            unchanged = false;
            continue;
        }
        let resolved = children
            .resolve(&src.with_digest(entry.digest.clone()))
            .await?;
        let image = convert_image(&children, &resolved, options, &pool, progress).await?;
        let digest = image.manifest_digest.to_string();
        push_image(client, &resolver.store, dst, &digest, &image, progress).await?;
        unchanged &= image.manifest_digest == entry.digest;
        manifests.push(Descriptor {
            media_type: image.media_type.clone(),
            digest: image.manifest_digest.clone(),
            size: image.manifest.len() as u64,
            ..entry.clone()
        });
    }
    let (bytes, media_type) = if unchanged {
        let media_type = index
            .media_type
            .clone()
            .unwrap_or_else(|| media::OCI_INDEX.to_owned());
        (index_bytes, media_type)
    } else {
        let out = ImageIndex {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_owned()),
            artifact_type: None,
            manifests,
            subject: None,
            annotations: index.annotations.clone(),
        };
        let bytes = serde_json::to_vec(&out).expect("JSON serialises");
        (bytes, media::OCI_INDEX.to_owned())
    };
    let digest = client
        .push_manifest(dst.registry(), dst.repository(), &tag, &media_type, &bytes)
        .await?;
    debug_assert!(!unchanged || digest == index_digest);
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry::new(path, kind, 0o755)
    }

    fn order(entries: &[Entry], wanted: &[&str], claimed: &mut HashSet<Vec<u8>>) -> Vec<String> {
        let wanted: Vec<Vec<u8>> = wanted.iter().map(|w| w.as_bytes().to_vec()).collect();
        let (order, n) = prioritized_order(entries, &wanted, claimed);
        let mut names: Vec<String> = order
            .iter()
            .map(|&i| String::from_utf8_lossy(&entries[i].path).into_owned())
            .collect();
        names.insert(n, "|".into());
        names
    }

    #[test]
    fn prioritised_files_come_first_with_their_parents_and_link_targets() {
        let mut link = e("bin/sh", EntryKind::Hardlink);
        link.link = Some(b"bin/busybox".to_vec());
        let entries = vec![
            e("", EntryKind::Dir),
            e("bin", EntryKind::Dir),
            e("bin/busybox", EntryKind::File),
            e("etc", EntryKind::Dir),
            e("etc/motd", EntryKind::File),
            e("etc/passwd", EntryKind::File),
            link,
        ];
        let mut claimed = HashSet::new();
        assert_eq!(
            order(&entries, &["etc/passwd", "bin/sh", "nope"], &mut claimed),
            [
                "etc",
                "etc/passwd",
                "bin",
                "bin/busybox",
                "bin/sh",
                "|",
                "",
                "etc/motd"
            ]
        );
        assert!(claimed.contains(b"etc/passwd".as_slice()));
        // A lower layer with the same files leaves them where they are: the upper one
        // provides them.
        assert_eq!(
            order(&entries, &["etc/passwd", "etc/motd"], &mut claimed),
            [
                "etc",
                "etc/motd",
                "|",
                "",
                "bin",
                "bin/busybox",
                "etc/passwd",
                "bin/sh"
            ]
        );
    }

    #[test]
    fn files_whose_place_matters_stay_in_place() {
        let entries = vec![
            e("a", EntryKind::Dir),
            e("a/.wh..wh..opq", EntryKind::File),
            e("a/f", EntryKind::File),
            e("b/.wh.g", EntryKind::File),
            e("b/g", EntryKind::File),
            e("dup", EntryKind::File),
            e("dup", EntryKind::File),
            e("c", EntryKind::Dir),
            e("c/h", EntryKind::File),
        ];
        let mut claimed = HashSet::new();
        assert_eq!(
            order(&entries, &["a/f", "b/g", "dup", "c/h", "c"], &mut claimed),
            [
                "c",
                "c/h",
                "|",
                "a",
                "a/.wh..wh..opq",
                "a/f",
                "b/.wh.g",
                "b/g",
                "dup",
                "dup"
            ]
        );
        // Each was claimed all the same: a lower layer must not put them first.
        assert_eq!(claimed.len(), 5, "{claimed:?}");
    }
}
