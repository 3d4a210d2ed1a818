//! Masks the credentials a URL may carry (a password, query values such as `?token=…`) before
//! the URL reaches a log line, an error message or an API answer. The stored URL, and the one
//! requested, stay whole.

/// What stands in for a masked part.
pub const MASK: &str = "***";

/// The URL with its password and every query value masked: what a log line, an error
/// message and the subscriptions API show.
pub fn url_str(text: &str) -> String {
    let Ok(mut url) = reqwest::Url::parse(text) else {
        return masked_text(text);
    };
    let mut changed = false;
    if url.password().is_some() && url.set_password(Some(MASK)).is_ok() {
        changed = true;
    }
    if let Some(q) = url.query().filter(|q| !q.is_empty()) {
        let q = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) => format!("{k}={MASK}"),
                None => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        url.set_query(Some(&q));
        changed = true;
    }
    if changed {
        url.into()
    } else {
        text.to_string()
    }
}

/// The same for text that does not parse as a URL: everything between `://` and an `@` before
/// the path is masked, and everything after `?`.
fn masked_text(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let end = out[start..].find('/').map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..end].rfind('@') {
            out.replace_range(start..start + at, MASK);
        }
    }
    if let Some(q) = out.find('?') {
        out.truncate(q + 1);
        out.push_str(MASK);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_query_values_are_masked() {
        assert_eq!(
            url_str("https://user:s3cret@example.com/h?token=abc&x=1&flag"),
            "https://user:***@example.com/h?token=***&x=***&flag"
        );
        // Nothing to mask: the text comes back as written.
        assert_eq!(url_str("https://example.com"), "https://example.com");
        assert_eq!(url_str("http://u@h/x?flag"), "http://u@h/x?flag");
    }

    #[test]
    fn text_that_is_no_url_is_masked_too() {
        assert_eq!(
            url_str("http://user:pw@exa mple/x?token=abc"),
            "http://***@exa mple/x?***"
        );
        assert_eq!(url_str("http://[?k=v"), "http://[?***");
        assert_eq!(url_str("http://a:b@%zz/?token=t"), "http://***@%zz/?***");
    }
}
