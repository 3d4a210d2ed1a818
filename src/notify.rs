//! systemd's notify protocol for a `Type=notify` service: `READY=1` once the API serves,
//! `STOPPING=1` when draining starts, and `WATCHDOG=1` pings at half the watchdog interval,
//! sent only while the writer thread answers and the scheduler runs, so a wedged daemon is
//! restarted rather than reported healthy.
//!
//! The socket and interval come from `config::SystemdEnv` (read once at start). Messages are
//! single datagrams on an unbound Unix socket; a path starting with `@` names an abstract socket.

use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use crate::config::SystemdEnv;
use crate::storage::writer::{WriteError, WriterHandle};

/// A connection to the service manager's notify socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier systemd asked for, or `None` when not run by systemd (or the socket is
    /// unusable, which is logged: the daemon runs on, systemd will time the start out).
    pub fn from_env(env: &SystemdEnv) -> Option<Self> {
        let target = env.notify_socket.as_deref()?;
        match Self::connect(target) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(socket = ?target, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from this daemon");
                None
            }
        }
    }

    fn connect(target: &std::ffi::OsStr) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = target.as_bytes();
        let addr = match bytes.split_first() {
            Some((b'@', name)) => abstract_addr(name)?,
            _ => SocketAddr::from_pathname(Path::new(target))?,
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends one notification (newline-separated `KEY=value` assignments).
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }

    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!(error = %e, state, "cannot notify systemd");
        }
    }

    /// The service is up: the API accepts connections.
    pub fn ready(&self, status: &str) {
        self.send_logged(&format!("READY=1\nSTATUS={status}"));
    }

    /// Draining has begun.
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1\nSTATUS=draining");
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// How often to ping for a given `WATCHDOG_USEC`: half of it, as sd_watchdog_enabled(3) advises.
pub fn ping_interval(watchdog: Duration) -> Duration {
    (watchdog / 2).max(Duration::from_millis(1))
}

/// Pings the watchdog every `every` while the writer answers a probe within that time and
/// `scheduler_alive()` holds; a missed ping is logged. Runs until `stop` resolves.
///
/// The probe is an empty commit, so it also proves the disk path end to end; a storage error
/// still counts as alive (the thread answered: a full disk is for readiness to report, and
/// a restart would not free space).
pub async fn watchdog(
    notifier: std::sync::Arc<Notifier>,
    every: Duration,
    writer: WriterHandle,
    scheduler_alive: impl Fn() -> bool,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => return,
        }
        let writer_alive = match tokio::time::timeout(every, writer.probe()).await {
            Ok(Ok(()) | Err(WriteError::Storage(_))) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "watchdog: the writer did not take a probe");
                false
            }
            Err(_) => {
                tracing::warn!("watchdog: the writer did not answer within {every:?}");
                false
            }
        };
        let scheduler = scheduler_alive();
        if !scheduler {
            tracing::warn!("watchdog: the scheduler task has ended");
        }
        if writer_alive && scheduler {
            notifier.send_logged("WATCHDOG=1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(socket: &str) -> SystemdEnv {
        SystemdEnv {
            notify_socket: Some(OsString::from(socket)),
            watchdog: None,
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_env(&env(&path.display().to_string())).unwrap();
        n.ready("up");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=up");
        n.stopping();
        assert!(recv(&listener).starts_with("STOPPING=1\n"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("dispatchd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_env(&env(&format!("@{name}"))).unwrap();
        n.send("WATCHDOG=1").unwrap();
        assert_eq!(recv(&listener), "WATCHDOG=1");
    }

    #[test]
    fn absent_socket_means_no_notifier() {
        assert!(Notifier::from_env(&SystemdEnv::default()).is_none());
    }

    #[test]
    fn pings_at_half_the_watchdog() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ping_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }
}
