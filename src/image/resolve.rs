//! Resolving a reference to one image: a verified manifest and config, all stored — from the
//! registry, or from the cache alone when that needs no network (pinned by digest and cached,
//! or `--offline`). A multi-platform index gives the entry for the platform; a Docker schema
//! 1 manifest is converted (every layer fetched to learn its diff_id, the config
//! synthesised, see `oci::schema1`).

use std::sync::Arc;

use futures_util::StreamExt as _;

use super::Error;
use super::source::RegistrySource;
use crate::layer::decompress::Limits;
use crate::oci::manifest::{Descriptor, ImageConfig, ImageIndex, ImageManifest, Manifest};
use crate::oci::schema1::{FetchedLayer, Schema1Manifest};
use crate::oci::{Digest, Platform, media};
use crate::reference::Reference;
use crate::registry::Client;
use crate::store::{BlobSource, Converted, Store};

/// Largest manifest or config we accept (real ones are a few KiB; this stops a hostile
/// registry from making us buffer gigabytes).
pub const MAX_DOCUMENT: u64 = 32 << 20;

/// How many layers download at once.
pub const LAYER_CONCURRENCY: usize = 4;

/// Where to look for an image and which one to pick.
#[derive(Clone)]
pub struct Resolver {
    pub store: Store,
    pub client: Client,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// `platform` was asked for explicitly: a requirement, checked against single-platform
    /// images too (else the host's platform, a preference).
    pub platform_explicit: bool,
    /// Use only the cache.
    pub offline: bool,
    /// How far layers may expand while they decompress.
    pub limits: Limits,
}

/// A reference resolved to one image: verified manifest and config bytes, all stored.
#[derive(Clone)]
pub struct Resolved {
    pub reference: Reference,
    /// Digest of the image manifest (for a multi-platform reference: the chosen entry).
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub media_type: String,
    pub manifest: ImageManifest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
    /// How far its layers may expand (`--max-layer-size`, `--max-expansion`).
    pub limits: Limits,
}

impl Resolved {
    /// The image ID: the digest of the exact config bytes.
    pub fn image_id(&self) -> &Digest {
        &self.manifest.config.digest
    }
}

/// The key of a tag in the store's reference index.
pub fn ref_key(r: &Reference) -> String {
    format!(
        "{}/{}:{}",
        r.registry(),
        r.repository(),
        r.tag().unwrap_or("latest")
    )
}

/// The top-level document as found: its digest, bytes and Content-Type (if from a registry).
struct Top {
    digest: Digest,
    bytes: Vec<u8>,
    content_type: Option<String>,
    from_registry: bool,
}

/// The image manifest chosen from the top-level document.
struct Chosen {
    digest: Digest,
    /// What `.manifest.json` shows: the bytes as served.
    bytes: Vec<u8>,
    media_type: Option<String>,
    manifest: ImageManifest,
    /// Picked from an index for the platform (else a single-platform image).
    from_index: bool,
}

impl Resolver {
    /// Layer blobs of `reference`'s repository, as the store's source.
    pub fn source(&self, reference: &Reference) -> Arc<RegistrySource> {
        RegistrySource::new(&self.client, reference, self.offline)
    }

    /// Resolve `reference` for `self.platform`, verify and store manifest and config, and
    /// record the image in the cache index.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, Error> {
        let top = self.top_document(reference).await?;
        let chosen = self.choose(reference, top).await?;
        let Chosen {
            digest: manifest_digest,
            bytes: manifest_bytes,
            manifest,
            ..
        } = &chosen;
        manifest
            .check_image()
            .map_err(|source| Error::document("manifest", manifest_digest, reference, source))?;
        let media_type = chosen
            .media_type
            .clone()
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());

        let (config_bytes, _) = self
            .fetch_document(reference, &manifest.config.digest, "config")
            .await?;
        let config = crate::oci::manifest::parse_config(&config_bytes).map_err(|source| {
            Error::document("config", &manifest.config.digest, reference, source)
        })?;
        crate::oci::manifest::check_layers(manifest, &config)
            .map_err(|source| Error::document("image", manifest_digest, reference, source))?;
        self.check_platform(reference, &config, chosen.from_index)?;
        self.record(reference, manifest_digest, manifest, &config);
        Ok(Resolved {
            reference: reference.clone(),
            manifest_digest: manifest_digest.clone(),
            manifest_bytes: manifest_bytes.clone(),
            media_type,
            manifest: chosen.manifest,
            config_bytes,
            config,
            limits: self.limits,
        })
    }

    /// The multi-platform index `reference` names, if it names one: its digest, bytes as
    /// served, and parsed form (`None` for an image manifest).
    pub async fn top_index(
        &self,
        reference: &Reference,
    ) -> Result<Option<(Digest, Vec<u8>, ImageIndex)>, Error> {
        let top = self.top_document(reference).await?;
        let parsed = crate::oci::manifest::parse_manifest(&top.bytes, top.content_type.as_deref())
            .map_err(|source| Error::document("manifest", &top.digest, reference, source))?;
        Ok(match parsed {
            Manifest::Index(index) => Some((top.digest, top.bytes, index)),
            _ => None,
        })
    }

    /// The top-level document: by digest from the cache if we can, else from the registry.
    async fn top_document(&self, reference: &Reference) -> Result<Top, Error> {
        let ref_key = ref_key(reference);
        let local = match reference.digest() {
            Some(d) if self.store.has_blob(d) => Some(d.clone()),
            Some(_) if self.offline => return Err(Error::not_cached(reference)),
            Some(_) => None,
            None if self.offline => Some(
                self.store
                    .get_ref(&ref_key)?
                    .ok_or_else(|| Error::not_cached(reference))?,
            ),
            None => None,
        };
        if let Some(digest) = local {
            let bytes = self.read_document(&digest)?;
            return Ok(Top {
                digest,
                bytes,
                content_type: None,
                from_registry: false,
            });
        }
        let resp = self
            .client
            .manifest(
                reference.registry(),
                reference.repository(),
                &reference.manifest_reference(),
            )
            .await?;
        // Under its digest, the bytes the digest covers (a signed schema 1 manifest's
        // signatures are kept in its conversion record).
        self.store.put_blob_bytes(&resp.digest, &resp.canonical)?;
        if reference.digest().is_none() {
            self.store.set_ref(&ref_key, &resp.digest)?;
        }
        Ok(Top {
            digest: resp.digest,
            bytes: resp.bytes.to_vec(),
            content_type: resp.content_type,
            from_registry: true,
        })
    }

    /// The image manifest the top-level document stands for: itself, the index entry for
    /// the platform, or a schema 1 manifest's conversion.
    async fn choose(&self, reference: &Reference, top: Top) -> Result<Chosen, Error> {
        let parsed = crate::oci::manifest::parse_manifest(&top.bytes, top.content_type.as_deref())
            .map_err(|source| Error::document("manifest", &top.digest, reference, source))?;
        let known = |ct: Option<String>| ct.filter(|c| media::manifest_kind(c).is_some());
        match parsed {
            Manifest::Image(m) => Ok(Chosen {
                media_type: m.media_type.clone().or(known(top.content_type)),
                digest: top.digest,
                bytes: top.bytes,
                manifest: m,
                from_index: false,
            }),
            Manifest::Schema1(s1) => {
                let digest = top.digest.clone();
                let (served, s1, manifest) = self
                    .convert_schema1(reference, top, s1)
                    .await
                    .map_err(|source| Error::Schema1 {
                        digest: digest.clone(),
                        reference: reference.to_string(),
                        source: Box::new(source),
                    })?;
                // Shown as what was served, not as what it became.
                Ok(Chosen {
                    media_type: Some(s1.media_type().to_owned()),
                    digest,
                    bytes: served,
                    manifest,
                    from_index: false,
                })
            }
            Manifest::Index(index) => {
                let entry: Descriptor =
                    crate::oci::manifest::select_platform(&index, &self.platform).map_err(
                        |source| Error::Platform {
                            reference: reference.to_string(),
                            source: Box::new(source),
                        },
                    )?;
                let (bytes, ct) = self
                    .fetch_document(reference, &entry.digest, "manifest")
                    .await?;
                let ct = ct.or_else(|| Some(entry.media_type.clone()).filter(|m| !m.is_empty()));
                let parsed = crate::oci::manifest::parse_manifest(&bytes, ct.as_deref()).map_err(
                    |source| Error::document("manifest", &entry.digest, reference, source),
                )?;
                let not_an_image = |kind| Error::IndexEntry {
                    digest: entry.digest.clone(),
                    reference: reference.to_string(),
                    kind,
                };
                match parsed {
                    Manifest::Image(m) => Ok(Chosen {
                        media_type: m.media_type.clone().or(known(ct)),
                        digest: entry.digest,
                        bytes,
                        manifest: m,
                        from_index: true,
                    }),
                    Manifest::Index(_) => Err(not_an_image(IndexEntryKind::Index)),
                    Manifest::Schema1(_) => Err(not_an_image(IndexEntryKind::Schema1)),
                }
            }
        }
    }

    /// An index entry was chosen for the platform already; a single-platform image must be
    /// for the platform asked for, when it was asked for.
    fn check_platform(
        &self,
        reference: &Reference,
        config: &ImageConfig,
        from_index: bool,
    ) -> Result<(), Error> {
        let image = config.platform();
        if self.platform_explicit
            && !from_index
            && !image.architecture.is_empty()
            && !self.platform.matches(&image)
        {
            return Err(Error::PlatformMismatch {
                reference: reference.to_string(),
                image: image.to_string(),
                wanted: self.platform.to_string(),
            });
        }
        Ok(())
    }

    /// Bookkeeping for `cache ls` and eviction: its failure must not fail the command.
    fn record(
        &self,
        reference: &Reference,
        manifest_digest: &Digest,
        manifest: &ImageManifest,
        config: &ImageConfig,
    ) {
        let layers = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(l, diff_id)| crate::store::LayerRecord {
                blob: l.digest.clone(),
                diff_id: diff_id.clone(),
                size: l.size,
            })
            .collect();
        if let Err(e) = self.store.record_image(
            &reference.to_string(),
            manifest_digest,
            &manifest.config.digest,
            layers,
        ) {
            tracing::warn!(
                "recording {reference} in the cache index: {}",
                crate::error::Chain(&e)
            );
        }
    }

    /// A schema 1 manifest as an image manifest, with the manifest bytes as served: from the
    /// store's record of an earlier conversion, else by fetching every layer now — a schema 1
    /// manifest has no diff_ids, so each layer is downloaded, verified against its blobSum,
    /// decompressed, hashed and extracted — and synthesising the config (`oci::schema1`).
    /// The top document's bytes are what the registry served when it came from there, else
    /// the cached canonical bytes (a signed manifest's signatures are then fetched again, by
    /// digest).
    async fn convert_schema1(
        &self,
        reference: &Reference,
        top: Top,
        s1: Schema1Manifest,
    ) -> Result<(Vec<u8>, Schema1Manifest, ImageManifest), Error> {
        let digest = &top.digest;
        if let Some(c) = self.store.get_converted(digest)? {
            let served = c.served.into_bytes();
            let s1 = match crate::oci::manifest::parse_manifest(&served, None) {
                Ok(Manifest::Schema1(s1)) => s1,
                _ => return Err(Error::Schema1Record),
            };
            return Ok((served, s1, c.manifest));
        }
        if self.offline {
            return Err(Error::Schema1NotCached {
                reference: reference.to_string(),
            });
        }
        let (served, s1) = if top.from_registry {
            (top.bytes, s1)
        } else {
            let resp = self.manifest_by_digest(reference, digest).await?;
            match crate::oci::manifest::parse_manifest(&resp.bytes, None) {
                Ok(Manifest::Schema1(s1)) => (resp.bytes.to_vec(), s1),
                _ => {
                    return Err(Error::Schema1Changed {
                        digest: digest.clone(),
                    });
                }
            }
        };

        let layers = self.fetch_schema1_layers(reference, &s1).await?;
        let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let config = s1.image_config(&diff_ids)?;
        let manifest = s1.image_manifest(&config, &layers);
        self.store
            .put_blob_bytes(&manifest.config.digest, &config)?;
        let converted = Converted {
            served: String::from_utf8(served).map_err(|_| Error::Schema1NotUtf8)?,
            manifest,
        };
        self.store.set_converted(digest, &converted)?;
        Ok((converted.served.into_bytes(), s1, converted.manifest))
    }

    /// Every distinct layer blob of a schema 1 manifest, fetched, verified and extracted (4
    /// at a time), with what streaming it found (diff_id, size, compression); base first.
    async fn fetch_schema1_layers(
        &self,
        reference: &Reference,
        s1: &Schema1Manifest,
    ) -> Result<Vec<FetchedLayer>, Error> {
        let blobs = s1.layer_blobs();
        let mut unique: Vec<Digest> = Vec::new();
        for b in &blobs {
            if !unique.contains(b) {
                unique.push((*b).clone());
            }
        }
        tracing::info!(
            %reference,
            layers = unique.len(),
            "schema 1 image: fetching every layer to compute its diff_id"
        );
        let source: Arc<dyn BlobSource> = self.source(reference);
        let fetches = unique.iter().map(|blob| {
            let source = source.clone();
            async move {
                self.store
                    .ensure_layer_of_blob(
                        source,
                        blob,
                        self.limits,
                        super::engine::layer_retry(),
                        Arc::new(|_| {}),
                    )
                    .await
                    .map(|found| (blob.clone(), found))
                    .map_err(Error::from)
            }
        });
        let mut found = std::collections::HashMap::new();
        let mut results = futures_util::stream::iter(fetches).buffer_unordered(LAYER_CONCURRENCY);
        while let Some(r) = results.next().await {
            let (blob, f) = r?;
            found.insert(blob, f);
        }
        Ok(blobs
            .iter()
            .map(|b| {
                let f: &crate::store::FoundLayer = &found[*b];
                FetchedLayer {
                    blob: (*b).clone(),
                    size: f.size,
                    compression: f.compression,
                    diff_id: f.diff_id.clone(),
                }
            })
            .collect())
    }

    /// The manifest `digest` of `reference`'s repository, from the registry (verified).
    async fn manifest_by_digest(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<crate::registry::ManifestResponse, Error> {
        Ok(self
            .client
            .manifest(
                reference.registry(),
                reference.repository(),
                &digest.to_string(),
            )
            .await?)
    }

    /// A cached manifest or config; a digest naming something large (a layer blob) is
    /// refused before it is read into memory.
    fn read_document(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let len = std::fs::metadata(self.store.blob_path(digest))
            .map(|m| m.len())
            .unwrap_or(0);
        if len > MAX_DOCUMENT {
            return Err(Error::NotADocument {
                digest: digest.clone(),
                len,
            });
        }
        Ok(self.store.read_blob(digest)?)
    }

    /// A manifest or config by digest: from the cache, else from the registry (verified,
    /// then stored).
    async fn fetch_document(
        &self,
        reference: &Reference,
        digest: &Digest,
        what: &'static str,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        if self.store.has_blob(digest) {
            return Ok((self.read_document(digest)?, None));
        }
        if self.offline {
            return Err(Error::NotCached {
                what: format!("{what} {digest} of {reference}"),
            });
        }
        let (bytes, ct) = if what == "config" {
            let b = self
                .client
                .blob_bytes(
                    reference.registry(),
                    reference.repository(),
                    digest,
                    MAX_DOCUMENT,
                )
                .await?;
            (b.to_vec(), None)
        } else {
            let r = self.manifest_by_digest(reference, digest).await?;
            (r.bytes.to_vec(), r.content_type)
        };
        self.store.put_blob_bytes(digest, &bytes)?;
        Ok((bytes, ct))
    }
}

/// What an index entry was instead of an image manifest.
#[derive(Clone, Copy, Debug)]
pub enum IndexEntryKind {
    Index,
    Schema1,
}

impl std::fmt::Display for IndexEntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IndexEntryKind::Index => "a nested index: not supported",
            IndexEntryKind::Schema1 => {
                "a schema 1 manifest inside an index: not supported (schema 1 images are \
                 single-platform; pull one by its own tag)"
            }
        })
    }
}
