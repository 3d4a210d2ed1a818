//! Scheduling: a pure timer wheel and the task that drives it from the durable schedule.

pub mod driver;
pub mod wheel;
