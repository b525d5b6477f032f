//! Events as ingestion delivers them downstream, built by name rather than by position.

use waymark_proto::common::v1::{Event, EventType};

/// Builds an [`Event`] as ingestion delivers it: fresh event and message ids, source
/// `src`, empty properties (track) or traits (identify) unless given, and no timestamps
/// unless `at` sets them.
///
/// `EventBuilder::track("Order Completed").user("u-1").properties(json!({"revenue": 5})).at(10).build()`
pub struct EventBuilder {
    event: Event,
}

impl EventBuilder {
    fn of(kind: EventType) -> Self {
        let mut event = Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            message_id: uuid::Uuid::now_v7().to_string(),
            source_id: "src".into(),
            ..Event::default()
        };
        event.set_type(kind);
        Self { event }
    }

    /// A track event named `name`, with empty properties.
    pub fn track(name: &str) -> Self {
        let mut builder = Self::of(EventType::Track);
        builder.event.event = name.into();
        builder.properties(serde_json::json!({}))
    }

    /// An identify event, with empty traits.
    pub fn identify() -> Self {
        Self::of(EventType::Identify).traits(serde_json::json!({}))
    }

    /// A page view of the page `name`.
    pub fn page(name: &str) -> Self {
        let mut builder = Self::of(EventType::Page);
        builder.event.name = name.into();
        builder
    }

    pub fn user(mut self, user_id: &str) -> Self {
        self.event.user_id = user_id.into();
        self
    }

    pub fn anonymous(mut self, anonymous_id: &str) -> Self {
        self.event.anonymous_id = anonymous_id.into();
        self
    }

    pub fn message_id(mut self, message_id: &str) -> Self {
        self.event.message_id = message_id.into();
        self
    }

    pub fn event_id(mut self, event_id: &str) -> Self {
        self.event.event_id = event_id.into();
        self
    }

    /// The track event's properties: a JSON object.
    pub fn properties(mut self, properties: serde_json::Value) -> Self {
        self.event.properties = Some(object(properties));
        self
    }

    /// The identify event's traits: a JSON object.
    pub fn traits(mut self, traits: serde_json::Value) -> Self {
        self.event.traits = Some(object(traits));
        self
    }

    /// The event's context (device, traits, channel hints): a JSON object.
    pub fn context(mut self, context: serde_json::Value) -> Self {
        self.event.context = Some(object(context));
        self
    }

    /// When it happened and was received, in seconds since the epoch.
    pub fn at(mut self, secs: i64) -> Self {
        let at = prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        };
        self.event.timestamp = Some(at);
        self.event.received_at = Some(at);
        self
    }

    pub fn build(self) -> Event {
        self.event
    }
}

fn object(json: serde_json::Value) -> prost_types::Struct {
    let serde_json::Value::Object(map) = json else {
        panic!("a JSON object, not {json}")
    };
    waymark_proto::json::struct_from_json(map)
}
