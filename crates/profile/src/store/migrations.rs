//! The schema, in order: `MIGRATIONS` and the SQL of each.

use waymark_kit::db::Migration;

const SCHEMA: &str = "
    CREATE TABLE profiles (
        profile_id TEXT PRIMARY KEY,
        merged_into TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        version BIGINT NOT NULL,
        state BYTEA NOT NULL
    );
    CREATE TABLE identities (
        id_type TEXT NOT NULL,
        id_value TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        PRIMARY KEY (id_type, id_value)
    );
    CREATE INDEX identities_profile ON identities (profile_id);
    CREATE TABLE timeline (
        event_id TEXT PRIMARY KEY,
        profile_id TEXT NOT NULL,
        ts BIGINT NOT NULL,
        channel SMALLINT NOT NULL,
        event_type SMALLINT NOT NULL,
        name TEXT NOT NULL,
        entry BYTEA NOT NULL
    );
    CREATE INDEX timeline_profile_ts ON timeline (profile_id, ts);
    CREATE TABLE applied_events (
        event_id TEXT PRIMARY KEY,
        applied_at BIGINT NOT NULL
    );
    CREATE TABLE merges (
        merge_id TEXT PRIMARY KEY,
        survivor_id TEXT NOT NULL,
        merged_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        evidence TEXT NOT NULL,
        merged_at BIGINT NOT NULL
    );
    CREATE INDEX merges_survivor ON merges (survivor_id);";

/// Schema of the profile service, in order. The same DDL serves both backends: SQLite
/// accepts BYTEA as a type name and stores blobs in such columns unchanged.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "profiles, identities, timeline, merges",
        postgres: SCHEMA,
        sqlite: SCHEMA,
    },
    waymark_kit::outbox::migration(2),
    Migration {
        version: 3,
        name: "timeline keeps each event whole, with the profile it was first applied to",
        postgres: TIMELINE_EVENTS,
        sqlite: TIMELINE_EVENTS,
    },
    Migration {
        version: 4,
        name: "suppressions, segments, unmerge audit",
        postgres: PRIVACY_AND_SEGMENTS,
        sqlite: PRIVACY_AND_SEGMENTS,
    },
    Migration {
        version: 5,
        name: "aggregate state beside each profile",
        postgres: "ALTER TABLE profiles ADD COLUMN aggregates BYTEA",
        sqlite: "ALTER TABLE profiles ADD COLUMN aggregates BYTEA",
    },
    Migration {
        version: 6,
        name: "idempotency from the timeline's key",
        // Every applied event has its timeline row; an erased profile's rows go, but its
        // identifiers are suppressed, so its events are dropped before this check matters.
        // Also room on each profiles page: every batch rewrites the profiles it touches,
        // and an update that fits beside the old version is HOT (no new index entry).
        postgres: "DROP TABLE applied_events; ALTER TABLE profiles SET (fillfactor = 70);",
        sqlite: "DROP TABLE applied_events",
    },
    Migration {
        version: 7,
        name: "applier counter",
        postgres: APPLIER_EPOCH,
        sqlite: APPLIER_EPOCH,
    },
    Migration {
        version: 8,
        name: "when decay next moves each profile's emotion label",
        postgres: EMOTION_DUE,
        sqlite: EMOTION_DUE,
    },
    Migration {
        version: 9,
        name: "generations of the segment definitions and the suppression list",
        postgres: GENERATIONS,
        sqlite: GENERATIONS,
    },
    waymark_kit::outbox::keyed_by_consumer(10),
    waymark_kit::outbox::packs(11),
    Migration {
        version: 12,
        name: "suppressions stored as keyed hashes",
        // Existing rows are clear; the service hashes them at start-up
        // (`hash_clear_suppressions`), since neither backend has HMAC built in.
        postgres: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
        sqlite: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
    },
    Migration {
        version: 13,
        name: "erased profiles whose cache tombstone has not reached Redis yet",
        postgres: PENDING_TOMBSTONES,
        sqlite: PENDING_TOMBSTONES,
    },
    waymark_kit::outbox::dead_letters::migration(14),
    waymark_kit::outbox::trace_links(15),
    Migration {
        version: 16,
        name: "profiles an Unmerge keeps apart",
        postgres: DO_NOT_MERGE,
        sqlite: DO_NOT_MERGE,
    },
    Migration {
        version: 17,
        name: "what each aggregate was last computed for, and its backfill",
        postgres: AGGREGATE_SPECS,
        sqlite: AGGREGATE_SPECS,
    },
];

/// One row per undone merge: the two profiles it had joined (`survivor_id` is the merge's
/// own survivor), and the live profiles holding each now (a side merged into a third profile later passes the pair on
/// to it), which is what resolution checks, from either side.
const DO_NOT_MERGE: &str = "
    CREATE TABLE do_not_merge (
        merge_id TEXT PRIMARY KEY,
        survivor_id TEXT NOT NULL,
        restored_id TEXT NOT NULL,
        live_survivor TEXT NOT NULL,
        live_restored TEXT NOT NULL,
        evidence TEXT NOT NULL,
        unmerged_at BIGINT NOT NULL
    );
    CREATE INDEX do_not_merge_survivor ON do_not_merge (live_survivor);
    CREATE INDEX do_not_merge_restored ON do_not_merge (live_restored);";

const PENDING_TOMBSTONES: &str = "
    CREATE TABLE pending_tombstones (
        profile_id TEXT PRIMARY KEY,
        erased_at BIGINT NOT NULL
    );";

/// Every replica learns of a changed segment or a new erasure at its next applier lock,
/// at no extra cost, and keeps both in memory in between.
const GENERATIONS: &str = "
    ALTER TABLE applier_epoch ADD COLUMN definitions BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE applier_epoch ADD COLUMN suppressions BIGINT NOT NULL DEFAULT 0;";

/// Only profiles whose emotion is still fading have a due time, so the index stays small
/// and rewrites of the others remain HOT updates.
/// Profiles from before are due at once: the first settling pass works out each one's
/// time (and leaves none to those without an emotion).
const EMOTION_DUE: &str = "
    ALTER TABLE profiles ADD COLUMN emotion_due_at BIGINT;
    CREATE INDEX profiles_emotion_due ON profiles (emotion_due_at)
        WHERE emotion_due_at IS NOT NULL;
    UPDATE profiles SET emotion_due_at = 0 WHERE merged_into IS NULL;";

/// One row every applier transaction advances; its row lock serialises appliers.
const APPLIER_EPOCH: &str = "
    CREATE TABLE applier_epoch (id SMALLINT PRIMARY KEY, epoch BIGINT NOT NULL);
    INSERT INTO applier_epoch (id, epoch) VALUES (1, 0);";

const TIMELINE_EVENTS: &str = "
    ALTER TABLE timeline ADD COLUMN origin_profile_id TEXT;
    ALTER TABLE timeline ADD COLUMN event BYTEA;
    CREATE INDEX timeline_moved ON timeline (origin_profile_id)
        WHERE origin_profile_id <> profile_id;";

const PRIVACY_AND_SEGMENTS: &str = "
    CREATE TABLE suppressions (
        id_type TEXT NOT NULL,
        id_value TEXT NOT NULL,
        suppressed_at BIGINT NOT NULL,
        synced_at BIGINT,
        PRIMARY KEY (id_type, id_value)
    );
    CREATE INDEX suppressions_time ON suppressions (suppressed_at);
    CREATE TABLE segments (
        segment_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        condition TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        generation BIGINT NOT NULL,
        backfilled_generation BIGINT NOT NULL
    );
    CREATE TABLE segment_members (
        segment_id TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        entered_at BIGINT NOT NULL,
        PRIMARY KEY (segment_id, profile_id)
    );
    CREATE INDEX segment_members_profile ON segment_members (profile_id);
    ALTER TABLE merges ADD COLUMN unmerged_at BIGINT;";

/// `done_through` is the last profile id whose backfill page committed ('' before
/// the first), so an interrupted backfill resumes after it.
const AGGREGATE_SPECS: &str = "
    CREATE TABLE aggregate_specs (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        removed BOOLEAN NOT NULL,
        backfilled BOOLEAN NOT NULL,
        done_through TEXT NOT NULL,
        profiles_done BIGINT NOT NULL,
        started_at BIGINT NOT NULL
    );";
