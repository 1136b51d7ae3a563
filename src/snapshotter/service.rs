//! The gRPC front of the [`Snapshotter`]: containerd's
//! `containerd.services.snapshots.v1.Snapshots` service (tonic + prost, code generated from
//! `proto/snapshots.proto` into [`super::proto`]) on a unix socket, as containerd's
//! `[proxy_plugins]` expects. Each call runs the snapshotter on a blocking thread; errors map
//! to the gRPC codes containerd's `errdefs` turns back into its own kinds (`AlreadyExists`
//! is how a remote `Prepare` tells containerd the layer needs no download).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use super::proto::snapshots_server::{Snapshots, SnapshotsServer};
use super::proto::{self as pb};
use super::{Error, Info, Mount, Snapshotter, meta::Kind};

/// Serve `snapshotter` on the unix socket at `address` (mode 0600) until `shutdown`
/// resolves. A stale socket (nobody answers on it) is replaced; any other file at the path
/// is an error, never removed.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = bind(address).await?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tracing::info!(address = %address.display(), "serving containerd's snapshots API");
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snapshotter)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other);
    let _ = std::fs::remove_file(address);
    result
}

async fn bind(address: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let what = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("socket {}: {e}", address.display()))
    };
    if let Some(parent) = address.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(what)?;
    }
    match std::fs::symlink_metadata(address) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(address).await.is_ok() {
                return Err(what(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process serves on it",
                )));
            }
            std::fs::remove_file(address).map_err(what)?;
        }
        Ok(_) => {
            return Err(what(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; not replacing it",
            )));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(address).map_err(what)?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600)).map_err(what)?;
    Ok(listener)
}

struct Service(Arc<Snapshotter>);

impl Service {
    /// Run `f` on a blocking thread (the snapshotter mounts, walks directories and may wait
    /// for a registry).
    async fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.0.clone();
        let result = tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Status::internal(format!("{what}: {e}")))?;
        result.map_err(|e| {
            let status = status(&e);
            if status.code() != tonic::Code::AlreadyExists && status.code() != tonic::Code::NotFound
            {
                tracing::warn!("{what}: {}", crate::error::Chain(&e));
            }
            status
        })
    }
}

fn status(e: &Error) -> Status {
    let msg = crate::error::Chain(e).to_string();
    match e {
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::NotFound(_) => Status::not_found(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::Meta(_) | Error::Store(_) | Error::Io { .. } | Error::View { .. } => {
            Status::unknown(msg)
        }
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn mounts(m: Vec<Mount>) -> Vec<pb::Mount> {
    m.into_iter()
        .map(|m| pb::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    let t = UNIX_EPOCH + Duration::from_nanos(ns);
    prost_types::Timestamp::from(t)
}

fn info(i: Info) -> pb::Info {
    let r = i.record;
    pb::Info {
        name: i.name,
        parent: r.parent,
        kind: match r.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created_ns)),
        updated_at: Some(timestamp(r.updated_ns)),
        labels: r.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .call("prepare", move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .call("view", move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.call("mounts", move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.call("commit", move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.call("remove", move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = self.call("stat", move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: no snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .call("update", move |s| {
                s.update(&i.name, labels(i.labels), &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let all = self.call("list", move |s| s.list(&r.filters)).await?;
        // containerd's own snapshotters send 100 infos per message.
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let (size, inodes) = self.call("usage", move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: size as i64,
            inodes: inodes as i64,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let removed = self.call("cleanup", |s| s.cleanup()).await?;
        if removed > 0 {
            tracing::info!(removed, "cleanup removed orphaned snapshot directories");
        }
        Ok(Response::new(()))
    }
}
