//! Bearer-token authentication with `publish` and `admin` scopes, compared in constant time.

use hyper::StatusCode;
use ring::hmac;

use super::error::ApiError;
use crate::config::{Scope, Token};

/// The configured tokens, kept only as HMAC tags under a per-process random key: checking a
/// presented token is one constant-time tag comparison per configured token, whatever the
/// lengths involved.
pub struct Auth {
    key: hmac::Key,
    tokens: Vec<(hmac::Tag, Vec<Scope>)>,
}

impl Auth {
    pub fn new(tokens: &[Token]) -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        let tokens = tokens
            .iter()
            .map(|t| (hmac::sign(&key, t.token.as_bytes()), t.scopes.clone()))
            .collect();
        Ok(Self { key, tokens })
    }

    /// With no tokens configured the API is open.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks an `Authorization` header value for a scope: 401 without a valid token, 403
    /// with a valid token that lacks the scope. `admin` includes `publish`.
    pub fn check(&self, header: Option<&[u8]>, need: Scope) -> Result<(), ApiError> {
        if self.is_open() {
            return Ok(());
        }
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token (Authorization: Bearer <token>)",
            ));
        };
        let mut scopes: Option<&[Scope]> = None;
        for (tag, s) in &self.tokens {
            if hmac::verify(&self.key, presented, tag.as_ref()).is_ok() {
                scopes = Some(s);
            }
        }
        match scopes {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid bearer token",
            )),
            Some(s) if s.contains(&Scope::Admin) || s.contains(&need) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this token lacks the {} scope",
                    match need {
                        Scope::Admin => "admin",
                        Scope::Publish => "publish",
                    }
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let tokens = vec![
            Token {
                token: "publish-token-0123456789".into(),
                scopes: vec![Scope::Publish],
            },
            Token {
                token: "admin-token-0123456789ab".into(),
                scopes: vec![Scope::Admin],
            },
        ];
        match Auth::new(&tokens) {
            Ok(a) => a,
            Err(_) => panic!("rng"),
        }
    }

    #[test]
    fn scopes() {
        let a = auth();
        let p = Some(&b"Bearer publish-token-0123456789"[..]);
        let ad = Some(&b"Bearer admin-token-0123456789ab"[..]);
        assert!(a.check(p, Scope::Publish).is_ok());
        assert_eq!(
            a.check(p, Scope::Admin).map_err(|e| e.status),
            Err(StatusCode::FORBIDDEN)
        );
        assert!(a.check(ad, Scope::Admin).is_ok());
        assert!(a.check(ad, Scope::Publish).is_ok());
        let bad = Some(&b"Bearer publish-token-012345678"[..]);
        assert_eq!(
            a.check(bad, Scope::Publish).map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            a.check(None, Scope::Publish).map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
        let basic = Some(&b"Basic publish-token-0123456789"[..]);
        assert_eq!(
            a.check(basic, Scope::Publish).map_err(|e| e.status),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn open_without_tokens() {
        let a = match Auth::new(&[]) {
            Ok(a) => a,
            Err(_) => panic!("rng"),
        };
        assert!(a.check(None, Scope::Admin).is_ok());
    }
}
