//! Inbound provider webhooks: signature verification schemes.

pub mod schemes;
pub mod source;
