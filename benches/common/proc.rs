//! The child processes a benchmark starts (the daemon, reference servers).

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A child process, killed if dropped while still running (so a failed bench leaves no orphan).
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    /// SIGTERM, then waits up to `grace` (and SIGKILLs after that).
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .context("cannot run kill")?;
        if !sent.success() {
            bail!("kill -TERM {} ({}) failed", self.child.id(), self.name);
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} still running {grace:?} after SIGTERM; killed",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
