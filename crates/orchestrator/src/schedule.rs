//! Durations, local times of day, time zones and quiet hours.
