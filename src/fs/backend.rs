//! What the filesystem needs from whoever provides the image: the merged tree and the local
//! files holding file contents (see [`Backend`]).

use std::sync::Arc;

use crate::layer::index::DataRef;
use crate::overlay::Tree;

/// Where the tree and file data come from. Called from FUSE worker threads; may block.
pub trait Backend: Send + Sync + 'static {
    /// The merged tree. The first call triggers fetching all layers; blocks until ready. A
    /// failure is logged and becomes EIO for the request that asked; the next request asks
    /// again (the backend decides whether to retry or repeat the error).
    fn tree(&self) -> Result<&Tree, BackendError>;

    /// The merged tree if it is built already, without building it (never blocks on a
    /// fetch): lets `stat` of the root and `statfs` answer without starting the fetch. The
    /// backend is the one place the tree is kept; the filesystem asks it every time.
    fn built_tree(&self) -> Option<&Tree>;

    /// Open the local file holding the content of a regular file (layer index, `DataRef`),
    /// read-only; blocks until it is local — or, for a file that is not
    /// [complete](Backend::is_complete), until a file exists that [`Backend::ensure`] fills.
    fn open(&self, layer: u32, data: DataRef) -> Result<std::fs::File, BackendError>;

    /// Whether the file `open` returns holds all of the content already. When it does not
    /// (a lazily fetched layer), reads call [`Backend::ensure`] first and never use
    /// passthrough.
    fn is_complete(&self, _layer: u32, _data: DataRef) -> bool {
        true
    }

    /// Make `len` bytes of the content from `offset` local in the file `open` returned;
    /// blocks until they are. Called before every read of a file that was not complete.
    fn ensure(
        &self,
        _layer: u32,
        _data: DataRef,
        _offset: u64,
        _len: u64,
    ) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Why the backend could not produce the tree or a file; logged at the FUSE boundary with
/// its whole chain of causes (an errno loses them). Carries the backend's own typed error.
#[derive(Clone, Debug)]
pub struct BackendError(Arc<dyn std::error::Error + Send + Sync>);

impl BackendError {
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
        BackendError(Arc::from(source.into()))
    }

    /// The error the backend returned, to downcast.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

/// Transparent: the backend's error's message, and its causes as `source()` (show it with
/// [`crate::error::Chain`]).
impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
