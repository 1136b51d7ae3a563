//! Snapshot metadata, persisted in an embedded database (redb, `metadata.redb` in the
//! snapshotter's root): one record per snapshot, by key, and the counter that names snapshot
//! directories. Every change is one redb write transaction, committed durably before the call
//! returns: after a crash the database holds each snapshot as it was before or after a call,
//! never half of one. The records are also kept in memory (a few hundred bytes each), so reads
//! never touch the disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::oci::Digest;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// What a snapshot is, in containerd's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, from `View`.
    View,
    /// Writable, from `Prepare`, until committed.
    Active,
    /// Read-only, a parent for others.
    Committed,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names its directory, `snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// The parent's key, or empty.
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created_ns: u64,
    pub updated_ns: u64,
    /// A committed snapshot imagefs serves from a registry image rather than from its
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

/// Where a remote snapshot's content comes from: layers `0..=layer` of an image, merged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The image, pinned to its manifest digest (`registry/repo:tag@sha256:…`): resolving it
    /// again needs no network once cached.
    pub reference: String,
    pub manifest: Digest,
    /// Index of the top layer in the manifest, base 0.
    pub layer: u32,
    /// That layer's blob and diff_id.
    pub blob: Digest,
    pub diff_id: Digest,
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot metadata {path}")]
pub struct MetaError {
    path: String,
    #[source]
    source: redb::Error,
}

/// The database and its records in memory. Not synchronised: the snapshotter holds it under
/// its state lock.
pub struct Meta {
    db: redb::Database,
    path: String,
    records: BTreeMap<String, Record>,
    next_id: u64,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Meta {
    /// Open (or create) the database at `path` and load every record.
    pub fn open(path: &Path) -> Result<Meta, MetaError> {
        let shown = path.display().to_string();
        let err = |source: redb::Error| MetaError {
            path: shown.clone(),
            source,
        };
        let db = redb::Database::create(path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        {
            txn.open_table(SNAPSHOTS).map_err(|e| err(e.into()))?;
            txn.open_table(COUNTERS).map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))?;
        let read = db.begin_read().map_err(|e| err(e.into()))?;
        let mut records = BTreeMap::new();
        let table = read.open_table(SNAPSHOTS).map_err(|e| err(e.into()))?;
        for row in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            match serde_json::from_slice::<Record>(v.value()) {
                Ok(r) => {
                    records.insert(k.value().to_owned(), r);
                }
                // A record this build cannot read is left in place (a newer build may) and
                // not served.
                Err(e) => tracing::warn!(key = k.value(), "unreadable snapshot record: {e}"),
            }
        }
        let next_id = read
            .open_table(COUNTERS)
            .and_then(|t| Ok(t.get(NEXT_ID)?.map(|v| v.value())))
            .map_err(|e| err(e.into()))?
            .unwrap_or(1);
        drop(table);
        Ok(Meta {
            db,
            path: shown,
            records,
            next_id,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Record> {
        self.records.get(key)
    }

    pub fn records(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.records.iter()
    }

    /// The committed snapshot containerd looks for after a remote `Prepare`: labelled with
    /// `containerd.io/snapshot.ref` = `target`, on `parent`.
    pub fn committed_target(&self, target: &str, parent: &str) -> Option<&str> {
        self.records
            .iter()
            .find(|(_, r)| {
                r.kind == Kind::Committed
                    && r.parent == parent
                    && r.labels.get(super::TARGET_REF).map(String::as_str) == Some(target)
            })
            .map(|(k, _)| k.as_str())
    }

    /// Whether any snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> bool {
        self.records.values().any(|r| r.parent == key)
    }

    /// A fresh directory id, persisted before it is handed out (never reused, even after a
    /// crash).
    pub fn allocate_id(&mut self) -> Result<u64, MetaError> {
        let id = self.next_id;
        self.write(|txn| {
            txn.open_table(COUNTERS)?.insert(NEXT_ID, id + 1)?;
            Ok(())
        })?;
        self.next_id = id + 1;
        Ok(id)
    }

    /// Insert or replace `key`'s record; with `remove`, also delete that key, in the same
    /// transaction (a commit renames the active snapshot).
    pub fn put(
        &mut self,
        key: &str,
        record: Record,
        remove: Option<&str>,
    ) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        self.write(|txn| {
            let mut t = txn.open_table(SNAPSHOTS)?;
            if let Some(old) = remove {
                t.remove(old)?;
            }
            t.insert(key, bytes.as_slice())?;
            Ok(())
        })?;
        if let Some(old) = remove {
            self.records.remove(old);
        }
        self.records.insert(key.to_owned(), record);
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<Option<Record>, MetaError> {
        self.write(|txn| {
            txn.open_table(SNAPSHOTS)?.remove(key)?;
            Ok(())
        })?;
        Ok(self.records.remove(key))
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), MetaError> {
        let err = |source: redb::Error| MetaError {
            path: self.path.clone(),
            source,
        };
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        f(&txn).map_err(err)?;
        txn.commit().map_err(|e| err(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: &str) -> Record {
        Record {
            id,
            kind: Kind::Active,
            parent: parent.into(),
            labels: BTreeMap::from([("a".into(), "b".into())]),
            created_ns: 1,
            updated_ns: 2,
            remote: None,
        }
    }

    #[test]
    fn records_and_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let mut m = Meta::open(&path).unwrap();
            assert_eq!(m.allocate_id().unwrap(), 1);
            assert_eq!(m.allocate_id().unwrap(), 2);
            m.put("k1", record(1, ""), None).unwrap();
            m.put("k2", record(2, "k1"), None).unwrap();
            let mut committed = record(2, "k1");
            committed.kind = Kind::Committed;
            m.put("c2", committed, Some("k2")).unwrap();
            m.put("gone", record(3, ""), None).unwrap();
            m.delete("gone").unwrap();
        }
        let mut m = Meta::open(&path).unwrap();
        let keys: Vec<&String> = m.records().map(|(k, _)| k).collect();
        assert_eq!(keys, ["c2", "k1"]);
        assert_eq!(m.get("c2").unwrap().kind, Kind::Committed);
        assert!(m.has_children("k1") && !m.has_children("c2"));
        let mut remote = record(4, "k1");
        remote.kind = Kind::Committed;
        remote
            .labels
            .insert(super::super::TARGET_REF.into(), "sha256:t".into());
        m.put("sha256:t", remote, None).unwrap();
        assert_eq!(m.committed_target("sha256:t", "k1"), Some("sha256:t"));
        assert_eq!(m.committed_target("sha256:t", "other"), None);
        assert_eq!(
            m.allocate_id().unwrap(),
            3,
            "ids are never handed out twice"
        );
    }
}
