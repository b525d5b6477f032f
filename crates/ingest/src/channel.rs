//! The canonical channel of an event: `context.channel` when it names one, otherwise
//! derived from what the context says about the library, device and user agent.

use waymark_proto::common::v1::{Channel, Event, EventType};
use waymark_proto::json::string_at;

/// Parses a channel name, accepting common spellings.
pub fn parse_channel(name: &str) -> Option<Channel> {
    let normalised = name.trim().to_ascii_lowercase().replace(['-', ' '], "_");
    let channel = match normalised.as_str() {
        "web" | "website" | "browser" => Channel::Web,
        "mobile_app" | "mobile" | "app" | "ios" | "android" => Channel::MobileApp,
        "email" | "e_mail" | "mail" => Channel::Email,
        "sms" | "mms" | "text" => Channel::Sms,
        "push" | "push_notification" => Channel::Push,
        "chat" | "live_chat" | "chatbot" | "messaging" => Channel::Chat,
        "contact_center" | "contact_centre" | "call_center" | "call_centre" | "support" => {
            Channel::ContactCenter
        }
        "phone" | "voice" | "call" => Channel::Phone,
        "social" | "social_media" => Channel::Social,
        "in_store" | "store" | "pos" | "retail" => Channel::InStore,
        "other" => Channel::Other,
        _ => return None,
    };
    Some(channel)
}

/// The canonical lower-case name of a channel.
pub fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Unspecified => "",
        Channel::Web => "web",
        Channel::MobileApp => "mobile_app",
        Channel::Email => "email",
        Channel::Sms => "sms",
        Channel::Push => "push",
        Channel::Chat => "chat",
        Channel::ContactCenter => "contact_center",
        Channel::Phone => "phone",
        Channel::Social => "social",
        Channel::InStore => "in_store",
        Channel::Other => "other",
    }
}

/// SDK name fragments that identify mobile and web libraries (Segment and RudderStack).
const MOBILE_LIBRARIES: &[&str] = &[
    "ios",
    "android",
    "react-native",
    "flutter",
    "swift",
    "kotlin",
    "xamarin",
    "unity",
    "cordova",
];
const WEB_LIBRARIES: &[&str] = &[
    "analytics.js",
    "analytics-next",
    "rudder-sdk-js",
    "analytics-js",
    "@segment/analytics",
];

/// The channel of `event`, from `context.channel` or derived from the context.
pub fn derive_channel(event: &Event) -> Channel {
    let Some(context) = event.context.as_ref() else {
        return fallback(event);
    };
    if let Some(channel) = string_at(context, &["channel"]).and_then(parse_channel) {
        return channel;
    }
    if let Some(library) = string_at(context, &["library", "name"]) {
        let library = library.to_ascii_lowercase();
        if MOBILE_LIBRARIES.iter().any(|m| library.contains(m)) {
            return Channel::MobileApp;
        }
        if WEB_LIBRARIES.iter().any(|w| library.contains(w)) {
            return Channel::Web;
        }
    }
    if context.fields.contains_key("app") && context.fields.contains_key("device") {
        return Channel::MobileApp;
    }
    if let Some(device) = string_at(context, &["device", "type"]) {
        let device = device.to_ascii_lowercase();
        if device == "ios" || device == "android" {
            return Channel::MobileApp;
        }
    }
    if context.fields.contains_key("page") || context.fields.contains_key("userAgent") {
        return Channel::Web;
    }
    fallback(event)
}

fn fallback(event: &Event) -> Channel {
    match event.r#type() {
        EventType::Page => Channel::Web,
        EventType::Screen => Channel::MobileApp,
        _ => Channel::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_proto::json::struct_from_json;

    fn event(kind: EventType, context: serde_json::Value) -> Event {
        let serde_json::Value::Object(map) = context else {
            panic!("object")
        };
        let mut e = Event {
            context: Some(struct_from_json(map)),
            ..Event::default()
        };
        e.set_type(kind);
        e
    }

    #[test]
    fn explicit_context_channel_wins() {
        let e = event(
            EventType::Track,
            serde_json::json!({"channel": "Call Center", "userAgent": "Mozilla"}),
        );
        assert_eq!(derive_channel(&e), Channel::ContactCenter);
    }

    #[test]
    fn derived_from_library_device_and_user_agent() {
        let cases = [
            (
                serde_json::json!({"library": {"name": "analytics-ios"}}),
                Channel::MobileApp,
            ),
            (
                serde_json::json!({"library": {"name": "analytics.js"}}),
                Channel::Web,
            ),
            (
                serde_json::json!({"library": {"name": "RudderLabs JavaScript SDK"}, "userAgent": "Mozilla/5.0"}),
                Channel::Web,
            ),
            (
                serde_json::json!({"device": {"type": "android"}}),
                Channel::MobileApp,
            ),
            (
                serde_json::json!({"app": {"name": "Shop"}, "device": {"id": "d1"}}),
                Channel::MobileApp,
            ),
            (
                serde_json::json!({"library": {"name": "analytics-node"}}),
                Channel::Other,
            ),
        ];
        for (context, expected) in cases {
            assert_eq!(
                derive_channel(&event(EventType::Track, context.clone())),
                expected,
                "{context}"
            );
        }
    }

    #[test]
    fn unknown_context_channel_falls_back_to_derivation() {
        let e = event(
            EventType::Page,
            serde_json::json!({"channel": "carrier pigeon"}),
        );
        assert_eq!(derive_channel(&e), Channel::Web);
        let e = event(EventType::Screen, serde_json::json!({}));
        assert_eq!(derive_channel(&e), Channel::MobileApp);
    }
}
