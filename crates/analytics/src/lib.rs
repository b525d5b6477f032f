//! Waymark analytics: answers funnels, paths, journey maps (stages with standard times),
//! journey reports and CX metrics from a compact in-memory representation of every event
//! the profile service resolved and every step the orchestrator took. PostgreSQL (SQLite
//! for `waymark dev`) holds what arrived and is the source of truth; memory is rebuilt
//! from it at start-up and kept current as events arrive.

pub mod report;
pub mod stats;
