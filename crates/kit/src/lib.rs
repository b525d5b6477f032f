//! The platform kit shared by every Waymark service.

pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod outbox;
pub mod secret;
pub mod service;
pub mod sink;
pub mod sql;
pub mod telemetry;
pub mod time;

pub use tokio_util::sync::CancellationToken;
