//! Waymark orchestrator: runs journeys in real time on the profile service's resolved
//! events (entries, condition and random splits, delays, waits for events, messages,
//! webhooks, trait updates and escalations) under one contact policy shared by every
//! journey, with durable timers and outbound actions that take effect once per step.

pub mod schedule;
