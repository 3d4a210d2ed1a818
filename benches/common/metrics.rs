//! The daemon's `/metrics`, scraped and read by name and label.

use std::net::SocketAddr;

use anyhow::{Result, anyhow, bail};

use super::REQUEST_TIMEOUT;
use super::http_client::get;

/// One scrape of `/metrics`: (name, labels, value) per sample line.
pub struct Scrape {
    pub samples: Vec<(String, String, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, rest) = match (line.find('{'), line.rfind('}')) {
                (Some(open), Some(close)) if open < close => {
                    (&line[..open], &line[open + 1..close], &line[close + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, rest)) => (name, "", rest),
                    None => continue,
                },
            };
            if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                samples.push((name.to_owned(), labels.to_owned(), v));
            }
        }
        Self { samples }
    }

    /// The sum of a metric's samples whose labels contain `label` (all when empty).
    pub fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The value of a metric without labels; an error when the scrape has none.
    pub fn value(&self, name: &str) -> Result<f64> {
        self.samples
            .iter()
            .rev()
            .find(|(n, l, _)| n == name && l.is_empty())
            .map(|(_, _, v)| *v)
            .ok_or_else(|| anyhow!("/metrics has no {name}"))
    }

    /// A metric's samples summed by the value of one label.
    pub fn by_label(&self, name: &str, key: &str) -> Vec<(String, f64)> {
        let pattern = format!("{key}=\"");
        let mut out: Vec<(String, f64)> = Vec::new();
        for (n, l, v) in &self.samples {
            if n != name {
                continue;
            }
            let Some(start) = l.find(&pattern).map(|i| i + pattern.len()) else {
                continue;
            };
            let value = l[start..].split('"').next().unwrap_or("").to_owned();
            match out.iter_mut().find(|(k, _)| *k == value) {
                Some((_, sum)) => *sum += v,
                None => out.push((value, *v)),
            }
        }
        out
    }
}

pub async fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let resp = get(addr, "/metrics", REQUEST_TIMEOUT).await?;
    if resp.status != 200 {
        bail!("GET /metrics answered {}", resp.status);
    }
    Ok(Scrape::parse(&String::from_utf8_lossy(&resp.body)))
}
