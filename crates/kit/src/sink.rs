//! The consumer side of `waymark.common.v1.EventSink`: a gRPC service that decodes each
//! delivered event on its own, so one event that does not decode (nested past prost's
//! recursion limit, say) is rejected alone instead of failing the whole batch and
//! stalling the producer's queue. The service hands the events that decode to an
//! [`EventConsumer`] and merges its rejections with the decoder's, by position in the
//! request.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::{Request, Response, Status};
use waymark_proto::common::v1::{DeliverResponse, EncodedDeliverRequest, Event, RejectedEvent};

/// A service that takes delivered events.
#[tonic::async_trait]
pub trait EventConsumer: Send + Sync + 'static {
    /// Applies `events` (those of the request that decoded, in order) from `producer`.
    /// In the response's `rejected`, `index` refers to `events` and `field` is the path
    /// within the event (`userId`; empty for the whole event): the server turns both into
    /// the request's terms (`events[7].userId`).
    async fn deliver(&self, producer: &str, events: Vec<Event>) -> Result<DeliverResponse, Status>;
}

/// The `EventSink` gRPC server over `T`.
pub struct EventSinkServer<T> {
    consumer: Arc<T>,
}

impl<T> EventSinkServer<T> {
    /// Serves `consumer`.
    pub fn new(consumer: Arc<T>) -> Self {
        Self { consumer }
    }
}

impl<T> Clone for EventSinkServer<T> {
    fn clone(&self) -> Self {
        Self {
            consumer: self.consumer.clone(),
        }
    }
}

impl<T> tonic::server::NamedService for EventSinkServer<T> {
    const NAME: &'static str = "waymark.common.v1.EventSink";
}

struct Deliver<T>(Arc<T>);

impl<T: EventConsumer> tonic::server::UnaryService<EncodedDeliverRequest> for Deliver<T> {
    type Response = DeliverResponse;
    type Future = BoxFuture<Response<DeliverResponse>, Status>;

    fn call(&mut self, request: Request<EncodedDeliverRequest>) -> Self::Future {
        let consumer = self.0.clone();
        Box::pin(async move {
            let raw = request.into_inner();
            let (events, positions, mut rejected) = decode_each(raw.events);
            let mut response = consumer.deliver(&raw.producer, events).await?;
            for r in response.rejected.drain(..) {
                let Some(&index) = positions.get(r.index as usize) else {
                    return Err(Status::internal(
                        "a consumer rejected an event it was not given",
                    ));
                };
                let field = if r.field.is_empty() {
                    format!("events[{index}]")
                } else {
                    format!("events[{index}].{}", r.field)
                };
                rejected.push(RejectedEvent { index, field, ..r });
            }
            rejected.sort_unstable_by_key(|r| r.index);
            response.rejected = rejected;
            Ok(Response::new(response))
        })
    }
}

/// The events that decode with their positions in the request, and a rejection for each
/// one that does not.
fn decode_each(raw: Vec<Vec<u8>>) -> (Vec<Event>, Vec<u32>, Vec<RejectedEvent>) {
    let mut events = Vec::with_capacity(raw.len());
    let mut positions = Vec::with_capacity(raw.len());
    let mut rejected = Vec::new();
    for (i, bytes) in raw.into_iter().enumerate() {
        match Event::decode(bytes.as_slice()) {
            Ok(event) => {
                events.push(event);
                positions.push(i as u32);
            }
            Err(error) => rejected.push(RejectedEvent {
                index: i as u32,
                event_id: String::new(),
                field: format!("events[{i}]"),
                reason: format!("does not decode as waymark.common.v1.Event: {error}"),
            }),
        }
    }
    (events, positions, rejected)
}

impl<T, B> tower_service::Service<http::Request<B>> for EventSinkServer<T>
where
    T: EventConsumer,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let consumer = self.consumer.clone();
        if request.uri().path() != "/waymark.common.v1.EventSink/Deliver" {
            return Box::pin(async move {
                Ok(
                    Status::unimplemented("no such method of waymark.common.v1.EventSink")
                        .into_http(),
                )
            });
        }
        Box::pin(async move {
            let codec =
                tonic_prost::ProstCodec::<DeliverResponse, EncodedDeliverRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(
                Some(crate::grpc::MAX_MESSAGE_BYTES),
                Some(crate::grpc::MAX_MESSAGE_BYTES),
            );
            Ok(grpc.unary(Deliver(consumer), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_that_does_not_decode_is_rejected_alone() {
        let good = Event {
            event_id: "e1".into(),
            ..Event::default()
        }
        .encode_to_vec();
        let (events, positions, rejected) = decode_each(vec![good.clone(), vec![0xff, 0xff], good]);
        assert_eq!(events.len(), 2);
        assert_eq!(positions, [0, 2]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 1);
        assert_eq!(rejected[0].field, "events[1]");
    }
}
