//! Client verbs of the profile service: profiles and segments, printed as JSON (shapes in
//! `render`).

use std::io::Write;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;
use waymark_kit::config::Config;
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;
use waymark_proto::profile::v1::*;

use crate::client::{admin, rpc_error};
use crate::render::{
    self, AggregateStatusView, DoNotMergeView, MergeView, ProfileView, SegmentView,
    TimelineEntryView, all,
};

/// Which profile service to talk to.
#[derive(Args)]
pub struct ProfileTarget {
    /// gRPC endpoint of the profile service.
    #[arg(
        long,
        global = true,
        env = "WAYMARK_PROFILE_ENDPOINT",
        default_value = "http://127.0.0.1:50052"
    )]
    endpoint: String,
}

#[derive(Subcommand)]
pub enum ProfilesCommand {
    /// Print a profile as JSON, by id or by any of its identifiers.
    Get(Lookup),
    /// Print a profile's timeline on every channel as JSON, newest first.
    Timeline {
        /// The profile id.
        profile_id: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Print everything held about a person as JSON: profile, whole timeline, merges and
    /// segments (the right of access).
    Export {
        /// The profile id.
        profile_id: String,
    },
    /// Erase a profile and every profile merged into it, and suppress its identifiers so
    /// later events carrying them are dropped. This cannot be undone, hence --yes.
    Delete {
        /// The profile id.
        profile_id: String,
        /// Why, recorded in the service's logs, e.g. a ticket reference.
        #[arg(long)]
        reason: String,
        /// Confirm the erasure; without it nothing is erased.
        #[arg(long)]
        yes: bool,
    },
    /// Print the merges into a profile as JSON, oldest first, and the pairs of profiles
    /// an unmerge keeps apart that hold for it.
    Merges {
        /// The surviving profile id.
        profile_id: String,
    },
    /// Split a wrong merge back out and keep the two profiles apart from then on; prints
    /// both profiles as JSON.
    Unmerge {
        /// The `mergeId` from `waymark profiles merges`.
        merge_id: String,
    },
    /// Lift the pair an unmerge keeps apart, so later evidence may merge the two profiles
    /// again; prints the pair as JSON.
    AllowMerge {
        /// The `mergeId` of the undone merge, from `doNotMerge` in `waymark profiles
        /// merges`.
        merge_id: String,
    },
    /// Print each configured aggregate as JSON, by name, with whether its backfill from
    /// the stored timelines is done (after it was added or changed) and its progress.
    Aggregates,
}

/// Exactly one way to find the profile.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Lookup {
    /// The profile id (a merged-away id finds the survivor).
    #[arg(long)]
    id: Option<String>,
    /// An e-mail address (matched lower-cased).
    #[arg(long)]
    email: Option<String>,
    /// A phone number (matched in E.164).
    #[arg(long)]
    phone: Option<String>,
    /// The user id the customer's systems send.
    #[arg(long)]
    user_id: Option<String>,
    /// Any identifier, e.g. anonymous_id=web-1, device_id=… or a custom type.
    #[arg(long, value_name = "TYPE=VALUE", value_parser = parse_identity)]
    identity: Option<Identity>,
}

impl Lookup {
    fn request(self) -> GetProfileRequest {
        if let Some(profile_id) = self.id {
            return GetProfileRequest {
                profile_id,
                identity: None,
            };
        }
        fn of_type(t: &'static str) -> impl FnOnce(String) -> Identity {
            move |value| Identity {
                r#type: t.to_owned(),
                value,
            }
        }
        let identity = self
            .identity
            .or_else(|| self.email.map(of_type("email")))
            .or_else(|| self.phone.map(of_type("phone")))
            .or_else(|| self.user_id.map(of_type("user_id")));
        GetProfileRequest {
            profile_id: String::new(),
            identity,
        }
    }
}

fn parse_identity(s: &str) -> Result<Identity, String> {
    match s.split_once('=') {
        Some((t, v)) if !t.trim().is_empty() && !v.is_empty() => Ok(Identity {
            r#type: t.trim().to_owned(),
            value: v.to_owned(),
        }),
        _ => Err("expected TYPE=VALUE, e.g. anonymous_id=web-1".into()),
    }
}

#[derive(Subcommand)]
pub enum SegmentsCommand {
    /// Create or replace a segment (the whole definition); membership is then computed
    /// for every profile in the background. Prints the stored segment as JSON.
    Put {
        /// 1-64 characters of a-z, 0-9, `_` and `-`.
        segment_id: String,
        /// A CEL condition over a profile, e.g. 'emotion.label == "upset"'.
        #[arg(long)]
        condition: String,
        /// Human-readable name.
        #[arg(long, default_value = "")]
        name: String,
        /// What the segment is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Print a segment with its member count as JSON.
    Get {
        /// The segment id.
        segment_id: String,
    },
    /// Print every segment as JSON, by id.
    List,
    /// Print the ids of a segment's members as a JSON array, ascending.
    Members {
        /// The segment id.
        segment_id: String,
    },
    /// Delete a segment; its members exit it.
    Delete {
        /// The segment id.
        segment_id: String,
    },
}

fn connect(endpoint: &str) -> anyhow::Result<ProfileServiceClient<Channel>> {
    let channel = waymark_kit::grpc::channel(endpoint)?;
    Ok(ProfileServiceClient::new(channel)
        .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES))
}

/// Prints `value` as indented JSON. A closed pipe (`| head`) is not an error.
fn print(value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    match std::io::stdout().lock().write_all(&text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// What `profiles export` prints.
#[derive(Serialize)]
struct ExportView<'a> {
    profile: Option<ProfileView<'a>>,
    timeline: Vec<TimelineEntryView<'a>>,
    merges: Vec<MergeView<'a>>,
    #[serde(rename = "doNotMerge")]
    do_not_merge: Vec<DoNotMergeView<'a>>,
    segments: Vec<SegmentView<'a>>,
}

/// What `profiles delete` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeletedView<'a> {
    profile_id: &'a str,
    suppressed: Vec<render::IdentityView<'a>>,
    timeline_entries: u64,
}

/// What `profiles merges` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MergesView<'a> {
    merges: Vec<MergeView<'a>>,
    do_not_merge: Vec<DoNotMergeView<'a>>,
}

/// What `profiles unmerge` prints.
#[derive(Serialize)]
struct UnmergeView<'a> {
    survivor: Option<ProfileView<'a>>,
    restored: Option<ProfileView<'a>>,
}

/// What `segments delete` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SegmentDeletedView<'a> {
    segment_id: &'a str,
    exited: u64,
}

pub async fn profiles(
    config: &Config,
    target: &ProfileTarget,
    command: ProfilesCommand,
) -> anyhow::Result<()> {
    if let ProfilesCommand::Delete {
        profile_id,
        reason,
        yes,
    } = &command
    {
        if !yes {
            bail!(
                "erasing profile {profile_id} cannot be undone; \
                 run again with --yes to erase it"
            );
        }
        if reason.trim().is_empty() {
            bail!("--reason must say why, e.g. a ticket reference");
        }
    }
    let mut client = connect(&target.endpoint)?;
    let fail = |status| rpc_error(status, &target.endpoint);
    match command {
        ProfilesCommand::Get(lookup) => {
            let response = client
                .get_profile(admin(config, lookup.request())?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&response.profile.as_ref().map(ProfileView::from))
        }
        ProfilesCommand::Timeline { profile_id, limit } => {
            let mut entries = Vec::new();
            let mut page_token = String::new();
            while entries.len() < limit as usize {
                let page = client
                    .get_timeline(admin(
                        config,
                        GetTimelineRequest {
                            profile_id: profile_id.clone(),
                            // The server's largest page.
                            page_size: (limit - entries.len() as u32).min(1000),
                            page_token,
                            ..GetTimelineRequest::default()
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                entries.extend(page.entries);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print(&all::<_, TimelineEntryView>(&entries))
        }
        ProfilesCommand::Export { profile_id } => {
            // The first page carries the profile, merges and segments; the timeline
            // comes a page at a time.
            let mut first: Option<ExportProfileResponse> = None;
            let mut timeline = Vec::new();
            let mut page_token = String::new();
            loop {
                let mut page = client
                    .export_profile(admin(
                        config,
                        ExportProfileRequest {
                            profile_id: profile_id.clone(),
                            page_size: 0,
                            page_token: page_token.clone(),
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                timeline.append(&mut page.timeline);
                page_token = std::mem::take(&mut page.next_page_token);
                first.get_or_insert(page);
                if page_token.is_empty() {
                    break;
                }
            }
            let export = first.unwrap_or_default();
            print(&ExportView {
                profile: export.profile.as_ref().map(ProfileView::from),
                timeline: all(&timeline),
                merges: all(&export.merges),
                do_not_merge: all(&export.do_not_merge),
                segments: all(&export.segments),
            })
        }
        ProfilesCommand::Delete {
            profile_id, reason, ..
        } => {
            let deleted = client
                .delete_profile(admin(config, DeleteProfileRequest { profile_id, reason })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&DeletedView {
                profile_id: &deleted.profile_id,
                suppressed: all(&deleted.suppressed),
                timeline_entries: deleted.timeline_entries,
            })
        }
        ProfilesCommand::Merges { profile_id } => {
            let listed = client
                .list_merges(admin(config, ListMergesRequest { profile_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&MergesView {
                merges: all(&listed.merges),
                do_not_merge: all(&listed.do_not_merge),
            })
        }
        ProfilesCommand::Unmerge { merge_id } => {
            let split = client
                .unmerge(admin(config, UnmergeRequest { merge_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&UnmergeView {
                survivor: split.survivor.as_ref().map(ProfileView::from),
                restored: split.restored.as_ref().map(ProfileView::from),
            })
        }
        ProfilesCommand::AllowMerge { merge_id } => {
            let allowed = client
                .allow_merge(admin(config, AllowMergeRequest { merge_id })?)
                .await
                .map_err(fail)?
                .into_inner()
                .allowed;
            print(&allowed.as_ref().map(DoNotMergeView::from))
        }
        ProfilesCommand::Aggregates => {
            let status = client
                .get_aggregate_status(admin(config, GetAggregateStatusRequest {})?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&all::<_, AggregateStatusView>(&status.aggregates))
        }
    }
}

pub async fn segments(
    config: &Config,
    target: &ProfileTarget,
    command: SegmentsCommand,
) -> anyhow::Result<()> {
    let mut client = connect(&target.endpoint)?;
    let fail = |status| rpc_error(status, &target.endpoint);
    match command {
        SegmentsCommand::Put {
            segment_id,
            condition,
            name,
            description,
        } => {
            let segment = Segment {
                segment_id,
                name,
                description,
                condition,
                ..Segment::default()
            };
            let stored = client
                .put_segment(admin(
                    config,
                    PutSegmentRequest {
                        segment: Some(segment),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&stored.segment.as_ref().map(SegmentView::from))
        }
        SegmentsCommand::Get { segment_id } => {
            let found = client
                .get_segment(admin(config, GetSegmentRequest { segment_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&found.segment.as_ref().map(SegmentView::from))
        }
        SegmentsCommand::List => {
            let segments = client
                .list_segments(admin(config, ListSegmentsRequest {})?)
                .await
                .map_err(fail)?
                .into_inner()
                .segments;
            print(&all::<_, SegmentView>(&segments))
        }
        SegmentsCommand::Members { segment_id } => {
            let mut members = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_segment_members(admin(
                        config,
                        ListSegmentMembersRequest {
                            segment_id: segment_id.clone(),
                            page_size: 1000,
                            page_token,
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                members.extend(page.profile_ids);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print(&members)
        }
        SegmentsCommand::Delete { segment_id } => {
            let deleted = client
                .delete_segment(admin(
                    config,
                    DeleteSegmentRequest {
                        segment_id: segment_id.clone(),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&SegmentDeletedView {
                segment_id: &segment_id,
                exited: deleted.exited,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_type_equals_value() {
        let i = parse_identity("anonymous_id=web=1").unwrap();
        assert_eq!(
            (i.r#type.as_str(), i.value.as_str()),
            ("anonymous_id", "web=1")
        );
        for bad in ["anonymous_id", "=x", "email="] {
            assert!(parse_identity(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn erasure_needs_yes_and_a_reason() {
        // Refused before any connection: nothing listens on port 9.
        let target = ProfileTarget {
            endpoint: "http://127.0.0.1:9".into(),
        };
        let delete = |reason: &str, yes| ProfilesCommand::Delete {
            profile_id: "p-1".into(),
            reason: reason.into(),
            yes,
        };
        let config = Config::default();
        let error = profiles(&config, &target, delete("ticket 17", false))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("--yes"), "{error}");
        let error = profiles(&config, &target, delete(" ", true))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("--reason"), "{error}");
    }
}
