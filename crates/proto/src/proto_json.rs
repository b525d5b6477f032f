//! The proto3 JSON mapping of any Waymark message, the form journey and policy files take
//! (YAML files are parsed to JSON first): field names in lowerCamelCase or as declared,
//! enums by name, well-known types in their JSON forms, and an unknown field refused by
//! name, so a typo in a file is an error rather than a silently missing setting.

use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set built with these types decodes")
});

/// `json` read as a `T` by the proto3 JSON mapping; the error names what does not fit.
pub fn from_json<T: Message + Name + Default>(json: &serde_json::Value) -> Result<T, String> {
    let descriptor = POOL
        .get_message_by_name(&T::full_name())
        .ok_or_else(|| format!("no descriptor for {}", T::full_name()))?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let message = DynamicMessage::deserialize_with_options(descriptor, json, &options)
        .map_err(|e| e.to_string())?;
    message.transcode_to::<T>().map_err(|e| e.to_string())
}

/// `message` in the proto3 JSON mapping, field names in lowerCamelCase, defaults left out.
pub fn to_json<T: Message + Name>(message: &T) -> serde_json::Value {
    let Some(descriptor) = POOL.get_message_by_name(&T::full_name()) else {
        return serde_json::Value::Null;
    };
    let mut dynamic = DynamicMessage::new(descriptor);
    if dynamic.transcode_from(message).is_err() {
        return serde_json::Value::Null;
    }
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestration::v1::JourneyDefinition;

    #[test]
    fn journeys_read_in_camel_case_or_declared_names_and_refuse_unknown_fields() {
        let camel = serde_json::json!({
            "journeyId": "welcome",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "hello", "reentry": "REENTRY_AFTER_EXIT"},
            "nodes": [{"id": "hello", "exit": {}}]
        });
        let declared = serde_json::json!({
            "journey_id": "welcome",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "hello", "reentry": "REENTRY_AFTER_EXIT"},
            "nodes": [{"id": "hello", "exit": {}}]
        });
        let a: JourneyDefinition = from_json(&camel).unwrap();
        let b: JourneyDefinition = from_json(&declared).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.entry.as_ref().unwrap().reentry, 3);
        assert_eq!(from_json::<JourneyDefinition>(&to_json(&a)).unwrap(), a);

        let typo = serde_json::json!({"journeyId": "welcome", "entrie": {}});
        let error = from_json::<JourneyDefinition>(&typo).unwrap_err();
        assert!(error.contains("entrie"), "{error}");
    }
}
