//! SPIRE integration.
//!
//! Will own: the SPIFFE Workload API client (node SVID), the SPIRE Delegated Identity API client
//! (SVIDs of the pods on this node, by selectors), reconnect with jittered capped backoff and
//! last-good caching, and a dev server speaking the same gRPC services on unix sockets (issuing
//! from the certs-dev CA, with TTL, rotation, revocation and CA rotation).
//!
//! Must not depend on: the agent or the datapath.
