//! Generated types for the Waymark protobuf contracts under `proto/`.

/// The encoded `FileDescriptorSet` of every Waymark proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/waymark_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("waymark.common.v1");
    }
}

pub mod ingest {
    pub mod v1 {
        tonic::include_proto!("waymark.ingest.v1");
    }
}

pub mod profile {
    pub mod v1 {
        tonic::include_proto!("waymark.profile.v1");
    }
}

pub mod orchestration {
    pub mod v1 {
        tonic::include_proto!("waymark.orchestration.v1");
    }
}

pub mod analytics {
    pub mod v1 {
        tonic::include_proto!("waymark.analytics.v1");
    }
}

pub mod json;
pub mod proto_json;

pub use prost_types;
