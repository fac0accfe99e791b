//! SPIFFE identities.
//!
//! Will own: `TrustDomain` and `SpiffeId` parsing per the SPIFFE ID specification, X.509-SVID
//! validation against a live bundle set with explicit trust-domain, SAN, key-usage and validity
//! checks, and the source trait through which SVID streams reach the agent.
//!
//! Must not depend on: the agent, the transport, or any SPIRE client; it is pure validation.
