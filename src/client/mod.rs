//! The operator's side: commands that run in their own process, not in the daemon. `ops`
//! calls a running daemon's API (events, deliveries, replay, dead letters, subscriptions,
//! reload); `backup` downloads a consistent copy of its database and checks database files.

pub mod backup;
pub mod ops;
