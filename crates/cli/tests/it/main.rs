//! The `waymark` binary as operators run it: separate processes, configured by
//! environment variables.

mod journeys;
mod reports;
mod support;
mod telemetry;
