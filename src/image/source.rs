//! The registry as the store's source of layer blobs ([`RegistrySource`]) and of blob byte
//! ranges for lazy eStargz layers ([`RegistryRanges`]). Failures that a caller acts on are
//! typed ([`SourceFailure`]): a registry that ignores Range, and `--offline`.

use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;

use crate::oci::Digest;
use crate::reference::Reference;
use crate::registry::Client;
use crate::store::{BlobBody, BlobSource, RangeSource, SourceError};

/// Why a source could not serve a blob, when it is not the registry's own error.
#[derive(Debug, thiserror::Error)]
pub enum SourceFailure {
    /// The registry answered a Range request with the whole blob (200): the caller should
    /// fetch the blob whole, once, instead of once per chunk.
    #[error("the registry ignores Range requests for blob {digest}: fetch it whole")]
    RangeIgnored { digest: Digest },
    #[error("blob {digest} is not in the cache and --offline is set")]
    Offline { digest: Digest },
    #[error(
        "bytes {}..{} of blob {digest} are not in the cache and --offline is set",
        range.start,
        range.end
    )]
    OfflineRange { digest: Digest, range: Range<u64> },
}

/// Whether `err`, or any of its causes, is [`SourceFailure::RangeIgnored`].
pub fn is_range_ignored(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if matches!(
            e.downcast_ref::<SourceFailure>(),
            Some(SourceFailure::RangeIgnored { .. })
        ) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Layer blobs of one repository, from the registry (its mirrors first).
pub struct RegistrySource {
    pub client: Client,
    pub registry: String,
    pub repository: String,
    /// `--offline`: every fetch fails with [`SourceFailure::Offline`].
    pub offline: bool,
}

impl RegistrySource {
    pub fn new(client: &Client, reference: &Reference, offline: bool) -> Arc<RegistrySource> {
        Arc::new(RegistrySource {
            client: client.clone(),
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            offline,
        })
    }
}

impl BlobSource for RegistrySource {
    fn fetch<'a>(
        &'a self,
        digest: &'a Digest,
        offset: u64,
    ) -> Pin<Box<dyn Future<Output = Result<BlobBody, SourceError>> + Send + 'a>> {
        Box::pin(async move {
            if self.offline {
                return Err(SourceFailure::Offline {
                    digest: digest.clone(),
                }
                .into());
            }
            let b = self
                .client
                .blob(&self.registry, &self.repository, digest, offset, None)
                .await?;
            let stream = b.body.map(|r| r.map_err(|e| Box::new(e) as SourceError));
            Ok(BlobBody {
                start: b.start,
                stream: Box::pin(stream),
            })
        })
    }
}

/// Blob ranges from the registry, for eStargz layers. A registry that answers a Range request
/// with the whole body (200) has the blob remembered, and every later range of it is refused
/// with [`SourceFailure::RangeIgnored`] without a request.
pub struct RegistryRanges {
    source: Arc<RegistrySource>,
    /// Blobs whose registry ignored Range. A std Mutex: held for set operations only.
    ignored: Mutex<std::collections::HashSet<Digest>>,
}

impl RegistryRanges {
    pub fn new(source: Arc<RegistrySource>) -> RegistryRanges {
        RegistryRanges {
            source,
            ignored: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Whether the registry answered a Range request for `digest` with the whole blob.
    pub fn ignored(&self, digest: &Digest) -> bool {
        self.ignored.lock().expect("ignored lock").contains(digest)
    }
}

impl RangeSource for RegistryRanges {
    fn fetch_range<'a>(
        &'a self,
        digest: &'a Digest,
        range: Range<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, SourceError>> + Send + 'a>> {
        Box::pin(async move {
            let s = &self.source;
            let ignored = || SourceFailure::RangeIgnored {
                digest: digest.clone(),
            };
            if self.ignored(digest) {
                return Err(ignored().into());
            }
            if s.offline {
                return Err(SourceFailure::OfflineRange {
                    digest: digest.clone(),
                    range,
                }
                .into());
            }
            if range.is_empty() {
                return Ok(Vec::new());
            }
            let b = s
                .client
                .blob(
                    &s.registry,
                    &s.repository,
                    digest,
                    range.start,
                    Some(range.end - 1),
                )
                .await?;
            // A registry that ignores Range sends the blob from 0: dropping the body closes
            // the connection rather than downloading it all once per chunk. (A range from 0,
            // like the landmark region, is served right either way: its bytes come first.)
            if b.start != range.start {
                self.ignored
                    .lock()
                    .expect("ignored lock")
                    .insert(digest.clone());
                return Err(ignored().into());
            }
            let len = (range.end - range.start) as usize;
            let mut out = Vec::with_capacity(len);
            let mut body = b.body;
            while out.len() < len {
                let Some(bytes) = body.next().await else {
                    break;
                };
                let bytes = bytes?;
                let take = bytes.len().min(len - out.len());
                out.extend_from_slice(&bytes[..take]);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn range_ignored_is_found_through_the_chain() {
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let wrapped = StoreError::Source {
            digest: digest.clone(),
            source: SourceFailure::RangeIgnored {
                digest: digest.clone(),
            }
            .into(),
        };
        assert!(is_range_ignored(&wrapped));
        let offline = StoreError::Source {
            digest: digest.clone(),
            source: SourceFailure::Offline { digest }.into(),
        };
        assert!(!is_range_ignored(&offline));
    }
}
