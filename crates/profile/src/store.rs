//! The profile service's tables. A profile's state is its encoded `Profile` (one row read
//! serves GetProfile); `identities` is the index resolution queries; `timeline` holds every
//! applied event, and its primary key is what makes delivery idempotent; `merges` is the
//! audit log. One module per responsibility; callers use the re-exports here.

mod aggregates;
mod applier;
mod batch;
mod idents;
mod merges;
mod migrations;
mod privacy;
mod records;
mod segments;
mod timeline;
mod unmerge;

pub use aggregates::*;
pub use applier::*;
pub use batch::*;
pub use merges::*;
pub use migrations::*;
pub use privacy::*;
pub use records::*;
pub use segments::*;
pub use timeline::*;
pub use unmerge::*;
