//! Pieces the load generators share: child processes, the HTTP client connection, the latency
//! histogram and the event request. Each benchmark uses a part of them.
#![allow(dead_code)]

pub mod event_request;
pub mod histogram;
pub mod http_client;
pub mod proc;
