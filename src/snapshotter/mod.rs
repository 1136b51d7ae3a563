//! A containerd remote snapshotter: containerd's snapshots API (`Prepare`, `View`, `Mounts`,
//! `Commit`, `Remove`, `Stat`, `Update`, `Usage`, `List` a.k.a. Walk, `Cleanup`) over the
//! engine, so that `ctr`, nerdctl and Kubernetes nodes start containers from lazily served
//! images. [`service`] is the gRPC front (tonic, on a unix socket); this module is the
//! snapshotter itself, usable without it.
//!
//! - **Local snapshots** behave as containerd's overlayfs snapshotter's: `snapshots/<id>/fs`
//!   (the upper directory, or the whole tree of a base layer) and `snapshots/<id>/work`;
//!   containerd applies layers into them when it pulls without remote labels.
//! - **Remote snapshots.** A `Prepare` whose labels name the image and layer it unpacks (the
//!   CRI plugin's `containerd.io/snapshot/cri.*` labels or `ctr-remote`'s
//!   `containerd.io/snapshot/remote/stargz.*`), with `containerd.io/snapshot.ref` naming the
//!   chain id it would commit, becomes a committed snapshot of that name at once, and the
//!   answer is `AlreadyExists`: containerd downloads nothing. Its content is layers `0..=i`
//!   of the image, merged by the engine and served by one FUSE mount (a *view*) at
//!   `snapshots/<id>/fs`, mounted when a mount first needs it. The chain id is checked
//!   against the image's diff_ids before the snapshot is made, so the view serves exactly what
//!   containerd asked for (or the `Prepare` falls back to a local snapshot).
//! - **Mounts** are overlayfs: a snapshot's parents, top first, down to and including the
//!   first remote one (its view already holds everything below it), as lower directories.
//! - **Metadata** is in [`meta`] (redb); remote snapshots pin their image in the store, so no
//!   cache bound or prune removes what they need.
//!
//! Every path acted on is built here from the root and a numeric id; nothing is removed while
//! a mount remains below it.

pub mod filter;
pub mod meta;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto;
pub mod service;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fs::{MountOptions, Unmounter};
use crate::image::{MountedImage, Resolved, Resolver, ServeOptions};
use crate::oci::Digest;
use crate::reference::Reference;
use filter::Filter;
use meta::{Kind, Meta, MetaError, Record, RemoteLayer, now_ns};

/// The label containerd sets on a `Prepare` when unpacking: the name (chain id) of the
/// committed snapshot the layer will become.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// containerd's CRI plugin's labels (with `disable_snapshot_annotations = false`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// stargz-snapshotter's `ctr-remote image rpull` labels (no manifest digest).
pub const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set on remote snapshots: the pinned image reference they serve.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/imagefs.remote";

/// Why a call failed; [`service`] maps each kind to containerd's gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serving remote snapshot {key:?} ({reference})")]
    View {
        key: String,
        reference: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// One mount containerd performs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A snapshot as `Stat` and `List` report it.
#[derive(Clone, Debug)]
pub struct Info {
    pub name: String,
    pub record: Record,
}

/// How the snapshotter serves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Its own directory: `metadata.redb` and `snapshots/`.
    pub root: PathBuf,
    /// How remote views are served (prefetch, lazy eStargz, cache bound).
    pub serve: ServeOptions,
    /// FUSE worker threads per view.
    pub threads: usize,
    /// FUSE passthrough for the views' local files.
    pub passthrough: bool,
}

/// The snapshotter. Calls block (file system work, mounts, registry round trips through
/// `rt`): an async front end runs them on blocking threads.
pub struct Snapshotter {
    root: PathBuf,
    resolver: Resolver,
    rt: tokio::runtime::Handle,
    options: Options,
    /// Names this snapshotter's pin in the store.
    pin_owner: String,
    state: Mutex<State>,
    /// Images resolved for remote `Prepare`s, by the labels that named them: an image's
    /// layers are prepared one after another, and each need not ask the registry again.
    resolved: Mutex<HashMap<String, Arc<Resolved>>>,
}

struct State {
    meta: Meta,
    /// Live FUSE views of remote snapshots, by snapshot id.
    views: HashMap<u64, View>,
}

impl State {
    fn record(&self, key: &str) -> Result<Record, Error> {
        self.meta
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(key.into()))
    }
}

struct View {
    image: Arc<MountedImage>,
    unmounter: Unmounter,
    serving: std::thread::JoinHandle<()>,
}

/// The image and layer a `Prepare`'s labels name.
struct Source {
    reference: Reference,
    /// The manifest, when the labels pin it (CRI); else the reference is resolved as is.
    manifest: Option<Digest>,
    layer: Digest,
}

impl Snapshotter {
    /// Open (creating, 0700) the snapshotter at `options.root`; detach FUSE views a previous
    /// run left (their daemon is gone) and renew the store pin from the metadata.
    pub fn open(
        resolver: Resolver,
        rt: tokio::runtime::Handle,
        options: Options,
    ) -> Result<Snapshotter, Error> {
        let root = &options.root;
        // Views are mounted suid and dev for containers: nobody but root may reach them, and
        // nobody but root may change what the snapshots hold. The cache's own rule.
        // SAFETY: geteuid has no preconditions.
        crate::store::check_cache_dir(root, unsafe { libc::geteuid() })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("snapshots"))
            .map_err(io_err(root))?;
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_err(root))?;
        let root = root.canonicalize().map_err(io_err(root))?;
        let meta = Meta::open(&root.join("metadata.redb"))?;
        for (_, r) in meta.records().filter(|(_, r)| r.remote.is_some()) {
            let fs = root.join("snapshots").join(r.id.to_string()).join("fs");
            match crate::fs::detach_imagefs(&fs) {
                Ok(true) => tracing::info!(path = %fs.display(), "detached a stale view"),
                Ok(false) => {}
                Err(e) => tracing::warn!(path = %fs.display(), "detaching a stale view: {e}"),
            }
        }
        let pin_owner = format!(
            "snapshotter-{}",
            &Digest::sha256(root.as_os_str().as_encoded_bytes()).hex()[..16]
        );
        let s = Snapshotter {
            root,
            resolver,
            rt,
            options,
            pin_owner,
            state: Mutex::new(State {
                meta,
                views: HashMap::new(),
            }),
            resolved: Mutex::new(HashMap::new()),
        };
        s.repin(&s.state.lock().expect("state lock").meta)?;
        Ok(s)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// `Prepare`: an active snapshot on `parent`, or — when the labels name a registry layer
    /// imagefs can serve — the committed remote snapshot, answered with `AlreadyExists`.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if let (Some(target), Some(source)) = (labels.get(TARGET_REF), source_of(&labels)) {
            if self
                .state
                .lock()
                .expect("state lock")
                .meta
                .committed_target(target, parent)
                .is_some()
            {
                return Err(Error::AlreadyExists(target.clone()));
            }
            match self.prepare_remote(target, parent, &source, &labels) {
                Ok(()) => return Err(Error::AlreadyExists(target.clone())),
                Err(e) => tracing::warn!(
                    layer = %source.layer,
                    "not serving the layer remotely, containerd will apply it: {}",
                    crate::error::Chain(&*e)
                ),
            }
        }
        self.create(key, parent, labels, Kind::Active)
    }

    /// `View`: a read-only snapshot of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(key, parent, labels, Kind::View)
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot needs a key".into()));
        }
        let mut st = self.state.lock().expect("state lock");
        if st.meta.get(key).is_some() {
            return Err(Error::AlreadyExists(key.into()));
        }
        if !parent.is_empty() {
            match st.meta.get(parent) {
                None => return Err(Error::NotFound(parent.into())),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
                Some(_) => {}
            }
        }
        let id = st.meta.allocate_id()?;
        let dir = self.dir(id);
        let mut b = std::fs::DirBuilder::new();
        b.mode(0o755);
        b.create(&dir).map_err(io_err(&dir))?;
        b.create(dir.join("fs")).map_err(io_err(&dir))?;
        if kind == Kind::Active {
            b.create(dir.join("work")).map_err(io_err(&dir))?;
        }
        let now = now_ns();
        let record = Record {
            id,
            kind,
            parent: parent.into(),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: None,
        };
        if let Err(e) = st.meta.put(key, record.clone(), None) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let mounts = self.mounts_of(&mut st, key, &record)?;
        self.answer(st, key, mounts)
    }

    fn prepare_remote(
        &self,
        target: &str,
        parent: &str,
        source: &Source,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (resolved, layer) = self.find_layer(source, target)?;
        let remote = RemoteLayer {
            reference: resolved
                .reference
                .with_digest(resolved.manifest_digest.clone())
                .to_string(),
            manifest: resolved.manifest_digest.clone(),
            layer: layer as u32,
            blob: resolved.manifest.layers[layer].digest.clone(),
            diff_id: resolved.config.rootfs.diff_ids[layer].clone(),
        };
        let mut st = self.state.lock().expect("state lock");
        if st.meta.committed_target(target, parent).is_some() {
            return Ok(());
        }
        // Named by the chain id, as containerd would name it; a second containerd namespace
        // unpacking the same layers on other parents gets a snapshot of its own (containerd
        // finds it by label and parent, not by name).
        let name = match st.meta.get(target) {
            None => target.to_owned(),
            Some(_) => format!("{target}@{parent}"),
        };
        if st.meta.get(&name).is_some() {
            return Err(format!("a snapshot named {name:?} exists").into());
        }
        if !parent.is_empty()
            && st
                .meta
                .get(parent)
                .is_none_or(|p| p.kind != Kind::Committed)
        {
            return Err(format!("parent {parent:?} is not a committed snapshot").into());
        }
        let id = st.meta.allocate_id()?;
        let fs = self.dir(id).join("fs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&fs)?;
        let mut labels = labels.clone();
        labels.insert(REMOTE_LABEL.into(), remote.reference.clone());
        let now = now_ns();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: Some(remote),
        };
        st.meta.put(&name, record, None)?;
        self.repin(&st.meta)?;
        tracing::info!(snapshot = name, layer, image = %resolved.reference, "remote snapshot");
        Ok(())
    }

    /// The image `source` names and the index of its layer, checked: the chain id of layers
    /// `0..=i` must be `target`. A cached resolution that does not fit (a tag that moved) is
    /// resolved again once.
    fn find_layer(
        &self,
        source: &Source,
        target: &str,
    ) -> Result<(Arc<Resolved>, usize), Box<dyn std::error::Error + Send + Sync>> {
        let memo_key = format!(
            "{}@{}",
            source.reference,
            source.manifest.as_ref().map_or("", |d| d.hex())
        );
        for fresh in [false, true] {
            let cached = self
                .resolved
                .lock()
                .expect("resolved")
                .get(&memo_key)
                .cloned();
            let resolved = match cached {
                Some(r) if !fresh => r,
                _ => {
                    let reference = match &source.manifest {
                        Some(m) => source.reference.with_digest(m.clone()),
                        None => source.reference.clone(),
                    };
                    let r = Arc::new(self.rt.block_on(self.resolver.resolve(&reference))?);
                    let mut memo = self.resolved.lock().expect("resolved");
                    // A handful of images at a time; an unbounded map would grow forever.
                    if memo.len() > 64 {
                        memo.clear();
                    }
                    memo.insert(memo_key.clone(), r.clone());
                    r
                }
            };
            // The same blob may be several layers of one image (old images repeat an empty
            // layer): the right one is the one whose chain id containerd asked for.
            let diff_ids = &resolved.config.rootfs.diff_ids;
            let mut positions = resolved
                .manifest
                .layers
                .iter()
                .enumerate()
                .filter(|(_, l)| l.digest == source.layer)
                .map(|(i, _)| i)
                .peekable();
            if positions.peek().is_none() {
                continue;
            }
            if let Some(i) = positions.find(|&i| chain_id(&diff_ids[..=i]).to_string() == target) {
                return Ok((resolved, i));
            }
            if fresh {
                return Err(format!(
                    "no layer {} of {} has the chain id containerd expects, {target}",
                    source.layer, resolved.reference
                )
                .into());
            }
        }
        Err(format!("{} has no layer {}", source.reference, source.layer).into())
    }

    /// Write the store pin: every image a remote snapshot serves.
    fn repin(&self, meta: &Meta) -> Result<(), Error> {
        let manifests: BTreeSet<Digest> = meta
            .records()
            .filter_map(|(_, r)| Some(r.remote.as_ref()?.manifest.clone()))
            .collect();
        Ok(self.resolver.store.pin(&self.pin_owner, &manifests)?)
    }

    /// `Mounts`: how to mount an active snapshot or a view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let mut st = self.state.lock().expect("state lock");
        let record = st.record(key)?;
        let mounts = self.mounts_of(&mut st, key, &record)?;
        self.answer(st, key, mounts)
    }

    /// The mounts of snapshot `key`; a view whose only lower is a remote snapshot's view also
    /// gets that view's image, whose tree the caller builds (outside the state lock) before
    /// answering: a read-only view is looked at directly, and its root's attributes are the
    /// image's only once the tree is built. (A container's root is overlayfs' upper directory:
    /// an active snapshot needs nothing built before it starts.)
    fn mounts_of(
        &self,
        st: &mut State,
        key: &str,
        r: &Record,
    ) -> Result<(Vec<Mount>, Option<Arc<MountedImage>>), Error> {
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: mount a view or an active snapshot of it"
            )));
        }
        let (lowers, image) = self.lowers(st, &r.parent)?;
        let build = image.filter(|_| r.kind == Kind::View && lowers.len() == 1);
        let dir = self.dir(r.id);
        let fs = dir.join("fs").display().to_string();
        let bind = |source: String, mode: &str| Mount {
            kind: "bind".into(),
            source,
            options: vec![mode.into(), "rbind".into()],
        };
        let mut options = Vec::new();
        if overlay_has_index() {
            options.push("index=off".to_owned());
        }
        let mounts = vec![match (r.kind, lowers.len()) {
            (Kind::Active, 0) => bind(fs, "rw"),
            (Kind::View, 0) => bind(fs, "ro"),
            (Kind::View, 1) => bind(lowers[0].clone(), "ro"),
            (kind, _) => {
                if kind == Kind::Active {
                    options.push(format!("workdir={}", dir.join("work").display()));
                    options.push(format!("upperdir={fs}"));
                }
                options.push(format!("lowerdir={}", lowers.join(":")));
                Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }
            }
        }];
        Ok((mounts, build))
    }

    /// Release the state lock, then build the tree a view's mounts wait for (see
    /// [`Snapshotter::mounts_of`]).
    fn answer(
        &self,
        st: std::sync::MutexGuard<'_, State>,
        key: &str,
        (mounts, build): (Vec<Mount>, Option<Arc<MountedImage>>),
    ) -> Result<Vec<Mount>, Error> {
        drop(st);
        if let Some(image) = build {
            image.tree().map_err(|e| Error::View {
                key: key.into(),
                reference: image.resolved().reference.to_string(),
                source: e.into(),
            })?;
        }
        Ok(mounts)
    }

    /// The lower directories of a snapshot on `parent`, top first: each local parent's
    /// directory, down to the first remote one, whose view (mounted now if it is not) holds
    /// all of its own chain; and that view's image.
    fn lowers(
        &self,
        st: &mut State,
        parent: &str,
    ) -> Result<(Vec<String>, Option<Arc<MountedImage>>), Error> {
        let mut out = Vec::new();
        let mut key = parent.to_owned();
        while !key.is_empty() {
            let r = st.record(&key)?;
            let fs = self.dir(r.id).join("fs");
            out.push(fs.display().to_string());
            if let Some(remote) = &r.remote {
                self.ensure_view(st, &key, r.id, remote)?;
                return Ok((out, st.views.get(&r.id).map(|v| v.image.clone())));
            }
            key = r.parent;
        }
        Ok((out, None))
    }

    /// Mount the view of remote snapshot `id` unless it is mounted.
    fn ensure_view(
        &self,
        st: &mut State,
        key: &str,
        id: u64,
        remote: &RemoteLayer,
    ) -> Result<(), Error> {
        if st.views.get(&id).is_some_and(|v| !v.serving.is_finished()) {
            return Ok(());
        }
        let view_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::View {
            key: key.into(),
            reference: remote.reference.clone(),
            source,
        };
        let reference: Reference = remote
            .reference
            .parse()
            .map_err(|e: crate::reference::ReferenceError| view_err(e.into()))?;
        let mut resolved = self
            .rt
            .block_on(self.resolver.resolve(&reference))
            .map_err(|e| view_err(e.into()))?;
        let top = remote.layer as usize;
        if resolved.manifest.layers.get(top).map(|l| &l.digest) != Some(&remote.blob) {
            return Err(view_err(
                format!("the image has no layer {} at {top}", remote.blob).into(),
            ));
        }
        resolved.manifest.layers.truncate(top + 1);
        resolved.config.rootfs.diff_ids.truncate(top + 1);
        let image = Arc::new(MountedImage::new(
            self.resolver.store.clone(),
            self.resolver.source(&reference),
            resolved,
            self.rt.clone(),
            self.options.serve.clone(),
        ));
        let mountpoint = self.dir(id).join("fs");
        let opts = MountOptions {
            fs_name: format!("imagefs:{reference}"),
            // The container's processes run as any user; the root is 0700, so nobody else
            // reaches the mount through it.
            allow_other: true,
            threads: self.options.threads.max(1),
            passthrough: self.options.passthrough,
            // A container's root filesystem, as on containerd's overlayfs snapshotter.
            nosuid: false,
            nodev: false,
            record: None,
            // Its mounts end with the snapshotter (containerd remounts them at its restart).
            survivable: false,
        };
        let mounted = crate::fs::mount(image.clone(), None, &mountpoint, &opts)
            .map_err(|e| view_err(e.into()))?;
        let unmounter = mounted.unmounter();
        let name = format!("view-{id}");
        let serving = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = mounted.run() {
                    tracing::error!("{}", crate::error::Chain(&e));
                }
            })
            .map_err(io_err(&mountpoint))?;
        tracing::info!(snapshot = key, path = %mountpoint.display(), "view mounted");
        st.views.insert(
            id,
            View {
                image,
                unmounter,
                serving,
            },
        );
        Ok(())
    }

    /// `Commit`: active snapshot `key` becomes committed snapshot `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let mut st = self.state.lock().expect("state lock");
        let mut r = st.record(key)?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        if st.meta.get(name).is_some() {
            return Err(Error::AlreadyExists(name.into()));
        }
        r.kind = Kind::Committed;
        r.labels = labels;
        r.updated_ns = now_ns();
        st.meta.put(name, r, Some(key))?;
        Ok(())
    }

    /// `Remove`: a snapshot without children; a remote one's view is unmounted first.
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        let mut st = self.state.lock().expect("state lock");
        let r = st.record(key)?;
        if st.meta.has_children(key) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} has children: remove them first"
            )));
        }
        if let Some(v) = st.views.remove(&r.id) {
            self.unmount_view(r.id, v)?;
        }
        st.meta.delete(key)?;
        self.remove_dir(r.id)?;
        if let Some(remote) = &r.remote {
            self.repin(&st.meta)?;
            let still_used = st.meta.records().any(|(_, o)| {
                o.remote
                    .as_ref()
                    .is_some_and(|o| o.manifest == remote.manifest)
            });
            if !still_used {
                match self.resolver.store.forget_image(&remote.manifest) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(image = %remote.manifest, "{}", crate::error::Chain(&e))
                    }
                }
            }
        }
        Ok(())
    }

    fn unmount_view(&self, id: u64, v: View) -> Result<(), Error> {
        let fs = self.dir(id).join("fs");
        v.unmounter.unmount().map_err(|e| Error::Io {
            path: fs.clone(),
            source: io::Error::other(e),
        })?;
        // Detached lazily if busy: the thread ends once its last user left; don't wait.
        if v.serving.is_finished() {
            let _ = v.serving.join();
        }
        Ok(())
    }

    /// Remove `snapshots/<id>`, unless something is still mounted in it.
    fn remove_dir(&self, id: u64) -> Result<(), Error> {
        let dir = self.dir(id);
        let mounted = crate::fs::mounts_under(&dir).map_err(io_err(&dir))?;
        if let Some(m) = mounted.first() {
            return Err(Error::FailedPrecondition(format!(
                "{} is still mounted; not removing {}",
                m.display(),
                dir.display()
            )));
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<Info, Error> {
        let record = self.state.lock().expect("state lock").record(key)?;
        Ok(Info {
            name: key.into(),
            record,
        })
    }

    /// `Update`: only labels change. `paths` empty or `labels`: replace them all;
    /// `labels.<key>`: set that one (or remove it, when `labels` lacks it).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, Error> {
        let mut st = self.state.lock().expect("state lock");
        let mut r = st.record(key)?;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            r.labels = labels;
        } else {
            for p in paths {
                let Some(label) = p.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {p:?} of a snapshot: only labels change"
                    )));
                };
                match labels.get(label) {
                    Some(v) => r.labels.insert(label.into(), v.clone()),
                    None => r.labels.remove(label),
                };
            }
        }
        r.updated_ns = now_ns();
        st.meta.put(key, r.clone(), None)?;
        Ok(Info {
            name: key.into(),
            record: r,
        })
    }

    /// `Usage`: disk bytes and inodes. A local snapshot's directory (for an active one, what
    /// it wrote); a remote one's layer as the store holds it (blob, extracted files, eStargz
    /// chunks fetched so far), inodes not counted.
    pub fn usage(&self, key: &str) -> Result<(u64, u64), Error> {
        let r = self.stat(key)?.record;
        if let Some(remote) = &r.remote {
            let bytes = self
                .resolver
                .store
                .layer_disk_bytes(&remote.blob, &remote.diff_id);
            return Ok((bytes, 0));
        }
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        disk_usage(&self.dir(r.id).join("fs"), &mut seen, &mut bytes);
        Ok((bytes, seen.len() as u64))
    }

    /// `List` (Walk): every snapshot the filters match.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, Error> {
        let filter = Filter::parse(filters).map_err(Error::InvalidArgument)?;
        let st = self.state.lock().expect("state lock");
        Ok(st
            .meta
            .records()
            .filter(|(k, r)| filter.matches(k, r))
            .map(|(k, r)| Info {
                name: k.clone(),
                record: r.clone(),
            })
            .collect())
    }

    /// `Cleanup`: remove snapshot directories no snapshot owns (left by a crash between a
    /// directory's creation and its record, or by a removal that failed half-way).
    pub fn cleanup(&self) -> Result<u64, Error> {
        let st = self.state.lock().expect("state lock");
        let ids: BTreeSet<u64> = st.meta.records().map(|(_, r)| r.id).collect();
        let snapshots = self.root.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&snapshots)
            .map_err(io_err(&snapshots))?
            .flatten()
        {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if ids.contains(&id) {
                continue;
            }
            match self.remove_dir(id) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("cleanup: {}", crate::error::Chain(&e)),
            }
        }
        Ok(removed)
    }

    /// Unmount every view (at shutdown). Containers still using one lose it: a snapshotter
    /// that stops takes its lazily served layers with it.
    pub fn shutdown(&self) {
        let mut st = self.state.lock().expect("state lock");
        for (id, v) in std::mem::take(&mut st.views) {
            if let Err(e) = self.unmount_view(id, v) {
                tracing::warn!("{}", crate::error::Chain(&e));
            }
        }
    }
}

/// The labels' image and layer, if they name one.
fn source_of(labels: &BTreeMap<String, String>) -> Option<Source> {
    let (reference, layer, manifest) = if let Some(r) = labels.get(CRI_IMAGE_REF) {
        (
            r,
            labels.get(CRI_LAYER_DIGEST)?,
            labels.get(CRI_MANIFEST_DIGEST),
        )
    } else {
        (
            labels.get(STARGZ_REF)?,
            labels.get(STARGZ_LAYER_DIGEST)?,
            None,
        )
    };
    Some(Source {
        reference: reference.parse().ok()?,
        manifest: manifest.and_then(|m| m.parse().ok()),
        layer: layer.parse().ok()?,
    })
}

/// The OCI chain id of `diff_ids` (image-spec config.md): the first diff_id, then
/// `sha256(previous + " " + next)` for each next.
pub fn chain_id(diff_ids: &[Digest]) -> Digest {
    let mut it = diff_ids.iter();
    let first = it.next().expect("a chain has a layer").clone();
    it.fold(first, |chain, d| {
        Digest::sha256(format!("{chain} {d}").as_bytes())
    })
}

/// Whether overlayfs has the `index` feature (containerd turns it off when it does: the index
/// would tie the lower directories' inodes to this mount).
fn overlay_has_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

/// Allocated bytes and distinct inodes under `path`, not crossing into other mounts.
fn disk_usage(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>, bytes: &mut u64) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if seen.insert((meta.dev(), meta.ino())) {
        *bytes += meta.blocks() * 512;
    }
    if meta.is_dir()
        && let Ok(dir) = std::fs::read_dir(path)
    {
        for e in dir.flatten() {
            if e.metadata().is_ok_and(|m| m.dev() == meta.dev()) {
                disk_usage(&e.path(), seen, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshotter on a fresh store and root; no registry is ever asked.
    fn open(dir: &Path, rt: &tokio::runtime::Runtime) -> Snapshotter {
        let store = crate::store::Store::open(dir.join("cache")).unwrap();
        let resolver = Resolver {
            store,
            client: crate::registry::Client::new(Default::default()).unwrap(),
            platform: crate::oci::Platform::host(),
            platform_explicit: false,
            offline: true,
            limits: Default::default(),
        };
        let options = Options {
            root: dir.join("root"),
            serve: ServeOptions {
                prefetch: crate::image::Prefetch::None,
                require_toc_digest: false,
                cache_max: None,
                read_around: 0,
            },
            threads: 1,
            passthrough: false,
        };
        Snapshotter::open(resolver, rt.handle().clone(), options).unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fs_of(s: &Snapshotter, key: &str) -> String {
        let id = s.stat(key).unwrap().record.id;
        s.dir(id).join("fs").display().to_string()
    }

    #[test]
    fn local_snapshots_follow_containerds_overlayfs_rules_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = open(dir.path(), &rt);
        let m = s.prepare("a", "", BTreeMap::new()).unwrap();
        assert_eq!(
            (m[0].kind.as_str(), &m[0].options[..]),
            ("bind", &["rw".to_string(), "rbind".into()][..])
        );
        assert!(matches!(
            s.prepare("a", "", BTreeMap::new()),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.prepare("x", "nope", BTreeMap::new()),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            s.prepare("x", "a", BTreeMap::new()),
            Err(Error::InvalidArgument(_))
        ));
        s.commit("c1", "a", labels(&[("l", "1")])).unwrap();
        assert!(matches!(s.stat("a"), Err(Error::NotFound(_))));
        assert!(matches!(s.mounts("c1"), Err(Error::FailedPrecondition(_))));

        let m = s.prepare("b", "c1", BTreeMap::new()).unwrap();
        let b = s.stat("b").unwrap().record.id;
        assert_eq!(m[0].kind, "overlay");
        let want_tail = [
            format!("workdir={}", s.dir(b).join("work").display()),
            format!("upperdir={}", fs_of(&s, "b")),
            format!("lowerdir={}", fs_of(&s, "c1")),
        ];
        assert!(m[0].options.ends_with(&want_tail), "{:?}", m[0].options);
        s.commit("c2", "b", BTreeMap::new()).unwrap();
        let v1 = s.view("v1", "c1", BTreeMap::new()).unwrap();
        assert_eq!(
            (v1[0].kind.as_str(), v1[0].source.clone()),
            ("bind", fs_of(&s, "c1"))
        );
        assert_eq!(v1[0].options, ["ro", "rbind"]);
        let v2 = s.view("v2", "c2", BTreeMap::new()).unwrap();
        let lower = format!("lowerdir={}:{}", fs_of(&s, "c2"), fs_of(&s, "c1"));
        assert_eq!(v2[0].options.last(), Some(&lower));
        assert!(!v2[0].options.iter().any(|o| o.starts_with("upperdir")));

        assert!(matches!(s.remove("c1"), Err(Error::FailedPrecondition(_))));
        let u = s
            .update(
                "c1",
                labels(&[("l", "2"), ("m", "3")]),
                &["labels.l".into()],
            )
            .unwrap();
        assert_eq!(u.record.labels, labels(&[("l", "2")]));
        assert!(matches!(
            s.update("c1", BTreeMap::new(), &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
        let names = |f: &[&str]| -> Vec<String> {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            s.list(&f).unwrap().into_iter().map(|i| i.name).collect()
        };
        assert_eq!(names(&[]), ["c1", "c2", "v1", "v2"]);
        assert_eq!(names(&["kind==view"]), ["v1", "v2"]);
        assert_eq!(names(&["parent==c1,kind==committed"]), ["c2"]);

        let c2 = s.stat("c2").unwrap().record.id;
        std::fs::write(s.dir(c2).join("fs/file"), vec![1u8; 10_000]).unwrap();
        let (bytes, inodes) = s.usage("c2").unwrap();
        assert!(bytes >= 10_000 && inodes == 2, "{bytes} {inodes}");

        // An orphaned directory (a crash between mkdir and the record) goes at Cleanup.
        std::fs::create_dir_all(s.dir(999).join("fs")).unwrap();
        assert_eq!(s.cleanup().unwrap(), 1);
        assert!(!s.dir(999).exists());

        s.remove("v2").unwrap();
        assert!(!s.dir(s_id(&s, "v1")).join("work").exists());
        drop(s);
        let s = open(dir.path(), &rt);
        assert_eq!(names_of(&s), ["c1", "c2", "v1"]);
        s.remove("v1").unwrap();
        s.remove("c2").unwrap();
        s.remove("c1").unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("root/snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    fn s_id(s: &Snapshotter, key: &str) -> u64 {
        s.stat(key).unwrap().record.id
    }

    fn names_of(s: &Snapshotter) -> Vec<String> {
        s.list(&[]).unwrap().into_iter().map(|i| i.name).collect()
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // From the image spec's example (config.md, "Layer ChainID").
        let a: Digest = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
            .parse()
            .unwrap();
        assert_eq!(chain_id(std::slice::from_ref(&a)), a);
        let b = Digest::sha256(b"b");
        let want = Digest::sha256(format!("{a} {b}").as_bytes());
        assert_eq!(chain_id(&[a.clone(), b.clone()]), want);
        let c = Digest::sha256(b"c");
        assert_eq!(
            chain_id(&[a, b, c.clone()]),
            Digest::sha256(format!("{want} {c}").as_bytes())
        );
    }

    #[test]
    fn labels_name_the_layer_for_cri_and_ctr_remote() {
        let d = Digest::sha256(b"x");
        let m = Digest::sha256(b"m");
        let cri = BTreeMap::from([
            (
                CRI_IMAGE_REF.to_string(),
                "127.0.0.1:5000/a/b:t".to_string(),
            ),
            (CRI_LAYER_DIGEST.to_string(), d.to_string()),
            (CRI_MANIFEST_DIGEST.to_string(), m.to_string()),
        ]);
        let s = source_of(&cri).unwrap();
        assert_eq!((s.layer, s.manifest), (d.clone(), Some(m)));
        let stargz = BTreeMap::from([
            (STARGZ_REF.to_string(), "127.0.0.1:5000/a/b:t".to_string()),
            (STARGZ_LAYER_DIGEST.to_string(), d.to_string()),
        ]);
        let s = source_of(&stargz).unwrap();
        assert_eq!((s.layer, s.manifest), (d.clone(), None));
        assert_eq!(s.reference.repository(), "a/b");
        let no_layer = BTreeMap::from([(STARGZ_REF.to_string(), "a/b:t".to_string())]);
        assert!(source_of(&no_layer).is_none());
        let bad = BTreeMap::from([
            (STARGZ_REF.to_string(), "a/b:t".to_string()),
            (STARGZ_LAYER_DIGEST.to_string(), "sha256:zz".to_string()),
        ]);
        assert!(source_of(&bad).is_none());
    }
}
