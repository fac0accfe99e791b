//! Generated protobuf and tonic code for the SPIFFE Workload API and the SPIRE Delegated
//! Identity API (from this crate's own `.proto` files, see `build.rs`), plus redacted `Debug`
//! for the messages that carry private keys.

#![allow(clippy::all, missing_docs)]

/// SPIFFE Workload API (no protobuf package: methods are `/SpiffeWorkloadAPI/<Method>`).
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    impl std::fmt::Debug for X509svid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X509svid")
                .field("spiffe_id", &self.spiffe_id)
                .field("x509_svid_len", &self.x509_svid.len())
                .field("x509_svid_key", &"redacted")
                .field("bundle_len", &self.bundle.len())
                .field("hint", &self.hint)
                .finish()
        }
    }
}

pub mod spire {
    pub mod api {
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
        }
        pub mod agent {
            pub mod delegatedidentity {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/spire.api.agent.delegatedidentity.v1.rs"
                    ));

                    impl std::fmt::Debug for X509svidWithKey {
                        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                            f.debug_struct("X509svidWithKey")
                                .field("x509_svid", &self.x509_svid)
                                .field("x509_svid_key", &"redacted")
                                .finish()
                        }
                    }
                }
            }
        }
    }
}

pub use spire::api::agent::delegatedidentity::v1 as delegated;
pub use spire::api::types;

/// The metadata key every Workload API call must carry with value `true`; SPIRE refuses calls
/// without it so that a browser or SSRF cannot reach the API.
pub const WORKLOAD_SECURITY_HEADER: &str = "workload.spiffe.io";
