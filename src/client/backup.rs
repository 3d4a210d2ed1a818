//! The `backup` and `verify-db` commands: download a consistent copy of a running daemon's
//! database over its admin API (`GET /v1/admin/backup`), and check a database file.
//!
//! A backup is written to `FILE.partial`, fsynced, checked like `verify-db` does (and against
//! the row counts the daemon announced), and only then renamed over `FILE`: a file at `FILE`
//! is always a complete, checked copy.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::api::backup::ROWS_HEADER;
use crate::storage::StoreError;
use crate::storage::backup::{VerifyReport, verify};

/// What a finished backup holds.
#[derive(Debug)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub report: VerifyReport,
}

/// Downloads a backup from the daemon at `url` into `output`; `ca_cert` is a PEM CA to
/// trust for an https:// daemon.
pub fn backup(
    url: &str,
    token: Option<&str>,
    ca_cert: Option<&Path>,
    output: &Path,
) -> anyhow::Result<BackupSummary> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let partial = partial_path(output);
    let result = runtime.block_on(download(url, token, ca_cert, &partial));
    let (bytes, announced) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let report = match check(&partial, &announced) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            output.display()
        )
    })?;
    sync_parent(output);
    Ok(BackupSummary {
        path: output.to_path_buf(),
        bytes,
        report,
    })
}

/// Checks a database file; `Err` when it cannot be read at all.
pub fn verify_db(path: &Path) -> anyhow::Result<VerifyReport> {
    match verify(path) {
        Ok(r) => Ok(r),
        Err(e @ StoreError::InUse(_)) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{}", path.display()))),
    }
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Streams the response body to `dest`; returns its size and the announced rows per table.
async fn download(
    url: &str,
    token: Option<&str>,
    ca_cert: Option<&Path>,
    dest: &Path,
) -> anyhow::Result<(u64, Vec<(String, u64)>)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    let client = super::ops::trusting(builder, ca_cert)
        .map_err(anyhow::Error::msg)?
        .build()
        .context("cannot build the HTTP client")?;
    let endpoint = format!("{}/v1/admin/backup", url.trim_end_matches('/'));
    let mut req = client.get(&endpoint);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                Some(format!(
                    "{}: {}",
                    e.get("code")?.as_str()?,
                    e.get("message")?.as_str()?
                ))
            })
            .unwrap_or(body);
        bail!("{endpoint} answered {status}: {detail}");
    }
    let announced = resp
        .headers()
        .get(ROWS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(parse_rows)
        .transpose()?
        .unwrap_or_default();
    let expected = resp.content_length();
    let mut file =
        std::fs::File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut bytes = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .context("the download broke off before the end")?
    {
        file.write_all(&chunk)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        bytes += chunk.len() as u64;
    }
    if let Some(n) = expected
        && n != bytes
    {
        bail!("received {bytes} bytes of {n}");
    }
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", dest.display()))?;
    Ok((bytes, announced))
}

fn parse_rows(s: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((t, n)) = part.split_once('=') else {
            bail!("malformed {ROWS_HEADER} header: {s:?}");
        };
        let n = n
            .parse::<u64>()
            .with_context(|| format!("malformed {ROWS_HEADER} header: {s:?}"))?;
        out.push((t.to_string(), n));
    }
    Ok(out)
}

/// Verifies the download and compares its rows with what the daemon copied.
fn check(path: &Path, announced: &[(String, u64)]) -> anyhow::Result<VerifyReport> {
    let report = verify_db(path)?;
    if !report.ok() {
        bail!(
            "the copy has {} problems, first: {}",
            report.problem_count,
            report.problems.first().map_or("", String::as_str)
        );
    }
    for (table, n) in announced {
        let got = report
            .tables
            .iter()
            .find(|(t, _)| t == table)
            .map(|(_, c)| *c);
        if got != Some(*n) {
            bail!(
                "table {table}: the daemon copied {n} rows, the file holds {}",
                got.map_or("none".to_string(), |c| c.to_string())
            );
        }
    }
    Ok(report)
}

/// Makes the rename durable.
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_header() {
        assert_eq!(
            parse_rows("events=3,deliveries=0").unwrap(),
            vec![("events".to_string(), 3), ("deliveries".to_string(), 0)]
        );
        assert!(parse_rows("events").is_err());
        assert!(parse_rows("events=x").is_err());
        assert!(parse_rows("").unwrap().is_empty());
    }

    #[test]
    fn partial_name() {
        assert_eq!(
            partial_path(Path::new("/b/x.redb")),
            PathBuf::from("/b/x.redb.partial")
        );
    }
}
