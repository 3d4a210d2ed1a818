//! The outbound HTTP client (one pooled reqwest client) and the classification of what an
//! endpoint answered into the outcome rules of the delivery contract.

use std::time::Duration;

use bytes::Bytes;

use super::ssrf::GuardedResolver;

/// `user-agent` of every outbound request.
pub const USER_AGENT: &str = concat!("dispatchd/", env!("CARGO_PKG_VERSION"));

/// Builds the one client shared by every destination: redirects are not followed, proxies
/// are not used (a proxy would hide the destination from the address guard), and every name
/// is resolved through the guard.
pub fn build(allow_private: bool) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // One attempt is one request: the scheduler retries, with backoff and a record of
        // each attempt. (Left on, the client would also copy every request's headers in
        // case it wanted to send it again.)
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(GuardedResolver::new(allow_private)))
        .user_agent(USER_AGENT)
        .pool_idle_timeout(Duration::from_secs(90))
        // As many idle connections as a destination may have attempts in flight (at most
        // 1024): with fewer, every attempt beyond the idle limit closed its connection on
        // return and the next one paid a new TCP handshake (connect, shutdown and socket
        // were ~7% of the daemon's CPU at 256 in flight).
        .pool_max_idle_per_host(1024)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
}

/// What came back from one attempt.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<String>,
    /// The first bytes of the body, at most the configured limit.
    pub body: Bytes,
}

/// Why an attempt got no response, named as recorded in attempts and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Timeout,
    Connect,
    RefusedAddress,
    /// The destination cannot be used at all (a URL, secret or header that does not parse):
    /// its deliveries go dead at their first attempt, with the reason.
    Unusable,
    Request,
    /// The attempt itself failed inside dispatchd (its task panicked).
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::RefusedAddress => "refused_address",
            ErrorKind::Unusable => "unusable_destination",
            ErrorKind::Request => "request",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Sends one request and reads at most `max_body` bytes of the answer.
pub async fn send(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, (ErrorKind, String)> {
    let fut = async {
        let mut resp = req.send().await.map_err(classify_error)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        // A body that fails midway still leaves the status: the attempt's outcome stands.
        while body.len() < max_body {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(max_body - body.len())]),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(Response {
            status,
            retry_after,
            body: Bytes::from(body),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err((
            ErrorKind::Timeout,
            format!("no response within {}", humantime::format_duration(timeout)),
        )),
    }
}

fn classify_error(e: reqwest::Error) -> (ErrorKind, String) {
    // The error's text would carry the URL, credentials and all; `last_error` is shown to
    // operators and logged.
    let e = e.without_url();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        if s.downcast_ref::<super::ssrf::SsrfError>().is_some() {
            return (ErrorKind::RefusedAddress, s.to_string());
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Request
    };
    (kind, error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How a response status steers a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    /// 410: the endpoint is gone for good; the subscription is disabled.
    Gone,
    /// Retry; `endpoint_failure` counts against the circuit breaker (429, 5xx).
    Retry {
        endpoint_failure: bool,
    },
    /// A configured final status: dead at once.
    Final,
}

/// 2xx succeeds; 410 disables; 429 and 5xx retry and count as endpoint failures; 3xx and
/// other 4xx retry unless configured final.
pub fn classify(status: u16, final_codes: &[u16]) -> Class {
    match status {
        200..=299 => Class::Success,
        410 => Class::Gone,
        429 | 500..=599 => Class::Retry {
            endpoint_failure: true,
        },
        s if final_codes.contains(&s) => Class::Final,
        _ => Class::Retry {
            endpoint_failure: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(200, &[]), Class::Success);
        assert_eq!(classify(204, &[]), Class::Success);
        assert_eq!(classify(410, &[]), Class::Gone);
        assert_eq!(
            classify(429, &[429]),
            Class::Retry {
                endpoint_failure: true
            }
        );
        assert_eq!(
            classify(503, &[]),
            Class::Retry {
                endpoint_failure: true
            }
        );
        assert_eq!(
            classify(302, &[]),
            Class::Retry {
                endpoint_failure: false
            }
        );
        assert_eq!(
            classify(400, &[]),
            Class::Retry {
                endpoint_failure: false
            }
        );
        assert_eq!(classify(400, &[400, 422]), Class::Final);
    }
}
