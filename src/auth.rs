//! Bearer-token authentication with `publish` and `admin` scopes, compared in constant time.
//! The API maps a refusal to 401/403; a config reload swaps the tokens in force.

use crate::swap::Swap;

use ring::hmac;

use crate::config::{Scope, Token};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is not (or no longer) configured.
    Invalid,
    /// A valid token without the scope the route needs.
    Lacks(Scope),
}

/// The configured tokens, kept only as HMAC tags under a per-process random key: checking a
/// presented token is one constant-time tag comparison per configured token, whatever the
/// lengths involved. A reload swaps the set whole: a removed token is refused from the next
/// request on.
pub struct Auth {
    key: hmac::Key,
    tokens: Swap<Tags>,
}

type Tags = Vec<(hmac::Tag, Vec<Scope>)>;

impl Auth {
    pub fn new(tokens: &[Token]) -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        let tokens = Swap::new(tags(&key, tokens));
        Ok(Self { key, tokens })
    }

    /// Puts a new set of tokens in force (config reload).
    pub fn replace(&self, tokens: &[Token]) {
        self.tokens.set(tags(&self.key, tokens));
    }

    /// With no tokens configured the API is open.
    pub fn is_open(&self) -> bool {
        self.tokens.get().is_empty()
    }

    /// Checks an `Authorization` header value for a scope: 401 without a valid token, 403
    /// with a valid token that lacks the scope. `admin` includes `publish`.
    pub fn check(&self, header: Option<&[u8]>, need: Scope) -> Result<(), Denied> {
        let tokens = self.tokens.get();
        if tokens.is_empty() {
            return Ok(());
        }
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return Err(Denied::Missing);
        };
        let mut scopes: Option<&[Scope]> = None;
        for (tag, s) in tokens.iter() {
            if hmac::verify(&self.key, presented, tag.as_ref()).is_ok() {
                scopes = Some(s);
            }
        }
        match scopes {
            None => Err(Denied::Invalid),
            Some(s) if s.contains(&Scope::Admin) || s.contains(&need) => Ok(()),
            Some(_) => Err(Denied::Lacks(need)),
        }
    }
}

fn tags(key: &hmac::Key, tokens: &[Token]) -> Tags {
    tokens
        .iter()
        .map(|t| (hmac::sign(key, t.token.as_bytes()), t.scopes.clone()))
        .collect()
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
        assert_eq!(a.check(p, Scope::Admin), Err(Denied::Lacks(Scope::Admin)));
        assert!(a.check(ad, Scope::Admin).is_ok());
        assert!(a.check(ad, Scope::Publish).is_ok());
        let bad = Some(&b"Bearer publish-token-012345678"[..]);
        assert_eq!(a.check(bad, Scope::Publish), Err(Denied::Invalid));
        assert_eq!(a.check(None, Scope::Publish), Err(Denied::Missing));
        let basic = Some(&b"Basic publish-token-0123456789"[..]);
        assert_eq!(a.check(basic, Scope::Publish), Err(Denied::Missing));
    }

    #[test]
    fn open_without_tokens() {
        let a = match Auth::new(&[]) {
            Ok(a) => a,
            Err(_) => panic!("rng"),
        };
        assert!(a.check(None, Scope::Admin).is_ok());
    }

    #[test]
    fn replaced_tokens_take_effect_at_once() {
        let a = auth();
        let p = Some(&b"Bearer publish-token-0123456789"[..]);
        let new = Some(&b"Bearer another-token-0123456789"[..]);
        a.replace(&[Token {
            token: "another-token-0123456789".into(),
            scopes: vec![Scope::Publish],
        }]);
        assert_eq!(a.check(p, Scope::Publish), Err(Denied::Invalid));
        assert!(a.check(new, Scope::Publish).is_ok());
        a.replace(&[]);
        assert!(a.check(None, Scope::Admin).is_ok(), "no tokens: open");
    }
}
