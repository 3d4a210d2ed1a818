//! `GET /v1/admin/backup` (admin scope): a consistent copy of the database, made from one read
//! transaction into a fresh redb file next to it and streamed back as the response body. The
//! `x-dispatchd-backup-rows` header lists the rows copied per table, so the client can check
//! what it received (`dispatchd backup` does).

use std::io::Read;

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CONTENT_DISPOSITION, CONTENT_TYPE, HeaderValue};

use super::error::ApiError;
use super::stream::{ChannelBody, streaming};
use super::{ApiState, Resp};
use crate::storage::backup::{Snapshot, SnapshotError, snapshot};
use crate::storage::schema::SCHEMA_VERSION;

/// Bytes per chunk of the streamed file.
const CHUNK: usize = 256 << 10;

/// The header listing rows per table: `events=3,deliveries=3,...`.
pub const ROWS_HEADER: &str = "x-dispatchd-backup-rows";
/// The header carrying the copy's schema version.
pub const SCHEMA_HEADER: &str = "x-dispatchd-schema-version";

/// `GET /v1/admin/backup`.
pub async fn backup(st: &ApiState) -> Result<Resp, ApiError> {
    let Some(store) = st.store.embedded().cloned() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_supported_on_postgres",
            "backups are of the embedded redb file; this daemon runs on PostgreSQL: back it up \
             with PostgreSQL's own tools (pg_dump, pg_basebackup, a managed service's snapshots)",
        ));
    };
    let snap = match tokio::task::spawn_blocking(move || snapshot(&store)).await {
        Ok(Ok(s)) => s,
        Ok(Err(SnapshotError::Busy)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "backup_in_progress",
                "another backup is being made; retry when it is done",
            ));
        }
        Ok(Err(SnapshotError::Store(e))) => {
            tracing::error!(error = %e, "backup failed");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backup_failed",
                "the copy could not be written (is the data directory's disk full?); see the daemon log",
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let file = std::fs::File::open(&snap.path).map_err(ApiError::internal)?;
    tracing::info!(bytes = snap.size, "streaming a backup");
    let rows = snap
        .tables
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let (tx, body) = ChannelBody::new(snap.size, 4);
    tokio::task::spawn_blocking(move || send_file(snap, file, tx));

    let mut resp = Resp::new(Default::default());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"dispatchd-backup.redb\""),
    );
    h.insert(SCHEMA_HEADER, HeaderValue::from(SCHEMA_VERSION));
    if let Ok(v) = HeaderValue::from_str(&rows) {
        h.insert(ROWS_HEADER, v);
    }
    Ok(streaming(resp, body))
}

/// Reads the snapshot into the channel; the snapshot file goes when this returns.
fn send_file(
    snap: Snapshot,
    mut file: std::fs::File,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut left = snap.size;
    while left > 0 {
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK))];
        if let Err(e) = file.read_exact(&mut buf) {
            tracing::error!(error = %e, "cannot read the backup snapshot");
            let _ = tx.blocking_send(Err(e));
            return;
        }
        left -= buf.len() as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            tracing::warn!("the backup client went away before the end");
            return;
        }
    }
    drop(snap);
}
