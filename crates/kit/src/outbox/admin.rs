//! `waymark.common.v1.OutboxService`: the operator's view of an outbox and its dead
//! letters, served by every service that has one.

use prost::Message;
use sea_orm::{DatabaseConnection, DbErr};
use tonic::{Request, Response, Status};
use waymark_proto::common::v1::outbox_service_server::{OutboxService, OutboxServiceServer};
use waymark_proto::common::v1::*;

use super::dead_letters::{self, Selection};
use crate::error::{Error, ErrorKind};

/// Page size when a request names none, and the most a page may hold.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Ids one retry or drop may name.
const MAX_IDS: usize = 1000;

/// The service over one outbox's database.
#[derive(Clone)]
pub struct OutboxAdmin {
    db: DatabaseConnection,
}

impl OutboxAdmin {
    /// The gRPC server of the outbox in `db`.
    pub fn server(db: DatabaseConnection) -> OutboxServiceServer<Self> {
        OutboxServiceServer::new(Self { db })
    }
}

/// Only the field the listing shows; prost skips the others without decoding them.
#[derive(Clone, PartialEq, prost::Message)]
struct EventIdOnly {
    #[prost(string, tag = "1")]
    event_id: String,
}

fn database(error: DbErr) -> Status {
    if crate::db::is_unavailable(&error) {
        Error::new(ErrorKind::Unavailable, "the database is unavailable").into()
    } else {
        Error::internal("outbox admin", &error).into()
    }
}

fn timestamp(micros: i64) -> waymark_proto::prost_types::Timestamp {
    waymark_proto::prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn selection(ids: Vec<i64>, all: bool, consumer: String) -> Result<Selection, Status> {
    match (ids.is_empty(), all) {
        (false, true) => Err(Error::invalid("all", "give either ids or all, not both").into()),
        (true, false) => Err(Error::invalid(
            "ids",
            "name the dead letters, or set all to act on every one",
        )
        .into()),
        (false, false) if ids.len() > MAX_IDS => {
            Err(Error::invalid("ids", format!("at most {MAX_IDS} per request")).into())
        }
        (false, false) if !consumer.is_empty() => {
            Err(Error::invalid("consumer", "only filters `all`; leave it empty with ids").into())
        }
        (false, false) => Ok(Selection::Ids(ids)),
        (true, true) => Ok(Selection::All {
            consumer: (!consumer.is_empty()).then_some(consumer),
        }),
    }
}

#[tonic::async_trait]
impl OutboxService for OutboxAdmin {
    #[tracing::instrument(skip_all)]
    async fn get_outbox_stats(
        &self,
        request: Request<GetOutboxStatsRequest>,
    ) -> Result<Response<GetOutboxStatsResponse>, Status> {
        let wanted = request.into_inner().consumer;
        let consumers = super::backlog(&self.db)
            .await
            .map_err(database)?
            .into_iter()
            .filter(|b| wanted.is_empty() || b.consumer == wanted)
            .map(|b| OutboxConsumerStats {
                consumer: b.consumer,
                pending: b.pending,
                oldest: b.oldest_micros.map(timestamp),
                dead_letters: b.dead_letters,
            })
            .collect();
        Ok(Response::new(GetOutboxStatsResponse { consumers }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(Error::invalid("page_size", format!("at most {MAX_PAGE}")).into());
            }
            n => n,
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<i64>()
                .map_err(|_| Error::invalid("page_token", "is not a token this service issued"))?
        };
        let consumer = (!r.consumer.is_empty()).then_some(r.consumer.as_str());
        let page = dead_letters::list(&self.db, consumer, after, size)
            .await
            .map_err(database)?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == size as usize => last.id.to_string(),
            _ => String::new(),
        };
        let dead_letters = page
            .into_iter()
            .map(|d| DeadLetter {
                id: d.id,
                consumer: d.consumer,
                event_ids: d
                    .events
                    .iter()
                    .map(|e| {
                        EventIdOnly::decode(e.as_slice())
                            .map(|e| e.event_id)
                            .unwrap_or_default()
                    })
                    .collect(),
                reason: d.reason,
                attempts: d.attempts.max(0) as u32,
                queued_at: Some(timestamp(d.created_at)),
                dead_at: Some(timestamp(d.dead_at)),
            })
            .collect();
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn retry_dead_letters(
        &self,
        request: Request<RetryDeadLettersRequest>,
    ) -> Result<Response<RetryDeadLettersResponse>, Status> {
        let r = request.into_inner();
        let selection = selection(r.ids, r.all, r.consumer)?;
        let requeued = dead_letters::retry(&self.db, &selection)
            .await
            .map_err(database)?;
        tracing::info!(requeued, "dead letters queued again");
        Ok(Response::new(RetryDeadLettersResponse { requeued }))
    }

    #[tracing::instrument(skip_all)]
    async fn drop_dead_letters(
        &self,
        request: Request<DropDeadLettersRequest>,
    ) -> Result<Response<DropDeadLettersResponse>, Status> {
        let r = request.into_inner();
        let selection = selection(r.ids, r.all, r.consumer)?;
        let dropped = dead_letters::drop(&self.db, &selection)
            .await
            .map_err(database)?;
        tracing::info!(dropped, "dead letters dropped");
        Ok(Response::new(DropDeadLettersResponse { dropped }))
    }
}
